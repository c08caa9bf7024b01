"""FFT convolution as matrix multiplies (FlashFFTConv): `fft_conv`, `fft_conv_reference`."""
from jaxft_kernels.fft_conv.ops import (default_block_h, direct_conv_reference, fft_conv,
                                        fft_conv_monarch, fft_conv_reference, fft_conv_sharded)

__all__ = ["fft_conv", "fft_conv_sharded", "fft_conv_reference", "fft_conv_monarch",
           "direct_conv_reference", "default_block_h"]
