"""Training code that reproduces the kernel's checkpoints (docs/training.md#what-is-trained-the-definitions). Not imported by the kernel itself.

    losses      sub-center ArcFace head, ArcFace with dynamic / fixed margins, softmax
    data        GLDv2 label CSVs, image folders, class map, dataset, long-tail-aware sampler
    augment     the 2021 augmentation pipeline (torchvision transforms v2)
    cutmix      Corner-Cutmix and its dual-stream loss (2020 retrieval 3rd place)
    nets        the nets a step trains (zoo models + training heads, plain Swin, ResNet/ResNeSt 2020)
    recipes     one recipe per model, every step as data (sources: docs/training.md)
    checkpoint  original-layout checkpoints, resumable state, weight transfer between steps
    fit         the training loop (mixed precision, DDP via torchrun, the recipes' schedules, sharded validation)
    cost        projected GPU-hours of every recipe step
    clean       DBSCAN cleaning of the training labels on descriptors (2020 retrieval 3rd place)
    smoke       a self-contained CPU run proving that the loop learns
    cli         ``python -m kernel.train fit|clean|cost|smoke``
"""
