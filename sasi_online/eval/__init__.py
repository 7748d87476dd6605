"""Evaluation of trained encoders on frozen features.

- `features`: clean (resize + centre crop + normalise) feature extraction, cached on disk.
- `knn`: weighted kNN (InstDisc / MoCo, k=200, T=0.07).
- `linear`: linear probe (standardised features, L-BFGS logistic regression).
- `semi`: class-balanced label subsets and SimCLR split files (1 % / 10 %).
- `tsne`: t-SNE PNG of ten classes.
- `checkpoint_loader`: `load_encoder(path) -> (method, Config)`.
- `suite`: `evaluate_checkpoint(...)` runs all of the above into a resumable eval.json.
- `report`: several runs side by side (Markdown + PNGs), like the paper's tables.

Submodules are imported on use, so `import sasi_online.eval` stays light.
"""
