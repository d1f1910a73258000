"""Target formats: quantize, dequantize, pack, and the quantization_config each writes."""
