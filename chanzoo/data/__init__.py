"""LightningDataModules, one per data source."""
from chanzoo.data.fashion_mnist import FashionMNISTDataModule
from chanzoo.data.image_folder import ImageFolderDataModule
from chanzoo.data.multichannel import MultiChannelDataModule
from chanzoo.data.restoration import BicubicSRDataModule, PairedFolderDataModule

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "MultiChannelDataModule", "PairedFolderDataModule", "BicubicSRDataModule"]
