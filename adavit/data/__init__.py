"""Datasets and transforms for training and evaluation."""
from .datasets import FashionMNIST, build_datasets, build_transform, data_config, read_idx

__all__ = ['FashionMNIST', 'build_datasets', 'build_transform', 'data_config', 'read_idx']
