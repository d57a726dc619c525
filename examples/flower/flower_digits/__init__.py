"""Flower's PyTorch quickstart on scikit-learn's bundled digits, with secagg's HE."""
