# `make utility`: the demo's steps (demo.py: the private GAN and its non-private reference start from a GAN of public
# phantoms) with a longer recipe, on the demo's phantoms; outputs in utility_work/.
_BASE = "demo"
# A public GAN twice as wide, trained 16 epochs (6,000 updates); the two GANs on the patients then train
# 16 // 3 = 5 epochs at batch 128 (demo.py PRIVATE_EPOCHS, config.FINETUNE_BATCH_SIZE).
NGF = 16
EPOCHS = 16
# Its reference, 470 updates at the private GAN's LRD, scored 0.736-0.764 over GAN seeds 12-14 above the private
# GAN's 0.638-0.696 (docs/2026-12-03-utility-run.md); the demo's slower reference critic was not measured here.
REFERENCE_LRD = None
