"""Model profiles: what a model needs per block, without loading its weights.

    resolve.profile(model, dtype=None)   the entry point (path, HF id in the local cache, catalog
                                         name, nn.Module) -> ModelProfile
    arch        the architecture table: transformers config dict -> exact parameter layout
    layout      TensorSpec / BlockLayout / ArchLayout and assemble_profile (the formulas)
    checkpoint  safetensors folders and files (exact bytes from the headers)
    gguf_file   GGUF files (exact quantized bytes from the header)
    module      nn.Module counting and the meta-device fallback (imports torch inside)
    catalog     published hyperparameters of popular models; diffusion: denoiser profiles
    profile     ModelProfile / BlockProfile (the contract); dtypes: dtype names and bytes

Importing this package imports nothing heavy.
"""
