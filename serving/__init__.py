"""Triton serving: `serving.launch.TritonServer` (the real tritonserver from the nvidia-pytriton wheel) and
`serving.client.TritonClient` (gRPC). Run as scripts: python serving/launch.py, python serving/client.py."""
