"""Calibration text for the int8 encoder: how large each input channel of each quantised MatMul gets.

The smoothing pass in invemb.export.optimize divides each channel by a scale taken from these maxima. The large
(outlier) channels are a property of the model and show up on any text; channels that a small calibration set
never fires are protected by the pass itself (no channel is amplified more than the median one). Measured on the
shipped encoder, 256 validation headlines, int8 1 - cosine vs fp32: these 48 sentences 0.0046, 512 training
headlines 0.0038, no smoothing 0.0169; so the export needs no dataset. The sentences are written for this file in
the style of financial news headlines; none is taken from the Kaggle set.
"""
from __future__ import annotations

CALIBRATION_TEXTS = (
    "Stocks slip as investors weigh the Fed's next move on interest rates",
    "Oil prices climb after OPEC signals deeper production cuts",
    "Tech giant beats quarterly earnings estimates, shares jump 8% after the bell",
    "Bank of England holds rates steady and warns of slower growth",
    "Dollar weakens against the yen as Treasury yields fall",
    "Retail sales rose 0.4% in March, beating economists' forecasts",
    "Carmaker recalls 300,000 vehicles over faulty airbags",
    "Why the bond market is flashing a recession warning",
    "China's exports fall for a third straight month amid trade tensions",
    "Airline shares tumble as fuel costs surge",
    "Startup raises $120 million in a funding round led by SoftBank",
    "Cramer: these three stocks could win from a weaker dollar",
    "Gold hits a six-month high on safe-haven demand",
    "European markets close lower; miners drag the FTSE 100",
    "Pharmaceutical firm agrees to a $2.1 billion takeover",
    "U.S. jobless claims unexpectedly rise to 230,000",
    "Brexit uncertainty weighs on sterling ahead of the vote",
    "Investors pile into ETFs as volatility returns",
    "Supermarket chain to cut 4,500 jobs in a store overhaul",
    "Housing starts drop to the lowest level since 2016",
    "Regulators fine the lender $85m over mis-sold loans",
    "Bitcoin falls below $7,000 as crypto selloff deepens",
    "Chipmaker warns of weak demand and lowers its full-year outlook",
    "The Dow rallies 400 points on hopes of a trade deal",
    "Wall Street's top analyst calls on Monday: Apple, Netflix and Ford",
    "Euro zone inflation edges up to 1.9% in February",
    "Boeing deliveries slump as the 737 MAX stays grounded",
    "What a strong dollar means for your portfolio",
    "Japan's Nikkei ends at a two-week low; exporters lead losses",
    "Insurer posts a record profit despite storm claims",
    "Fed minutes show officials split over the pace of hikes",
    "Mortgage rates climb for a fifth week in a row",
    "Shares of the streaming service soar after subscriber growth",
    "IMF cuts its global growth forecast to 3.3%",
    "Energy stocks lead the S&P 500 higher as crude rebounds",
    "Trump says tariffs on $200 billion of Chinese goods will go ahead",
    "Coronavirus fears send global markets into a tailspin",
    "Retailer files for bankruptcy protection after a weak holiday season",
    "Canadian dollar firms as oil prices recover",
    "Hedge fund manager bets against European banks",
    "UK house prices fall 0.7% in October, says Nationwide",
    "Shares in the miner jump on a surprise dividend",
    "Treasury yields rise after a strong payrolls report",
    "Watch: the market's biggest movers in premarket trading",
    "India's central bank cuts its key rate by 25 basis points",
    "Oil major to sell $10bn of assets and trim spending",
    "Consumer confidence falls to its lowest since 2013",
    "Facebook faces a fresh probe over data privacy",
)
