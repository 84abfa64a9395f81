"""Post-processing: descriptors -> answers (docs/postprocessing.md).

* :mod:`.knn` - k-NN landmark voting (labels and confidences);
* :mod:`.retrieval` - ensemble cosine, 2021 soft up/down and 2019 two-stage re-ranking;
* :mod:`.recognition` - family averaging and the 2020 non-landmark post-processing;
* :mod:`.pipeline` - descriptor store -> predictions for both tracks;
* :mod:`.cli` - the ``postprocess`` command.
"""
