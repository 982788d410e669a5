"""Making compressed weight formats: packing, calibration, MixLLM salience, `fitserve quantize`."""
