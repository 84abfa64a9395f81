"""Offline inference kernel of the 2021 Google Landmark Recognition & Retrieval winning solution.

Layout (follows the data):
    kernel.models        model zoo: the nine ensemble members, checkpoint loading, demo weights
    kernel.data          image sources (Kaggle folders, plain folders, CSVs) and robust decoding
    kernel.extract       one pass over the images feeding every model
    kernel.store         the descriptor store (the interface between extraction and post-processing)
    kernel.search        exact chunked cosine k-NN
    kernel.postprocess   retrieval re-ranking and recognition post-processing
    kernel.metrics       GAP and mAP@100 as Kaggle computes them
    kernel.submission    writing and checking submission.csv
    kernel.cli           ``python -m kernel ...``
"""

__version__ = "0.1.0"
