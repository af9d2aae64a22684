"""Quantized checkpoints: written in the compressed-tensors layout, read back for evaluation.

    from alphaquant.export import AtomicDir, QuantizedCheckpointWriter, load_quantized
    with AtomicDir("out/olmoe-w4", overwrite=False) as tmp:
        w = QuantizedCheckpointWriter(tmp, model, specs, records, source_dir="path/to/source")
        for i, layer in enumerate(model.model.layers):
            w.write_layer(i, layer)               # after layer i is quantized
        w.finish(extra_files={"alphaquant_recipe.json": {...}})
    qmodel = load_quantized("out/olmoe-w4")

compressed.py: one linear <-> tensors; qconfig.py: config.json's quantization_config;
writer.py / reader.py: whole checkpoints; atomic.py: the output directory. Layouts: README.md.
"""
from .atomic import AtomicDir, check_output_dir
from .compressed import AQ_PACKED, Layout, compress, decompress, layout_of
from .qconfig import quantization_config
from .reader import decompress_modules, load_quantized
from .writer import DequantizedCheckpointWriter, LayerCompressor, QuantizedCheckpointWriter

__all__ = ["AQ_PACKED", "AtomicDir", "DequantizedCheckpointWriter", "LayerCompressor", "Layout",
           "QuantizedCheckpointWriter", "check_output_dir", "compress", "decompress", "decompress_modules",
           "layout_of", "load_quantized", "quantization_config"]
