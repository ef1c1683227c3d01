"""The programs: python -m train.{pretrain,finetune,translate,visualize,convert,bench}."""
