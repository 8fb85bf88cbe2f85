"""DiffSynth's classes at tiny widths, and the loader of a tiny original-layout test folder's files
(`orchestrator.demo.tiny_folder`): the model class and configuration come from the folder's marker
instead of DiffSynth's recognition by fingerprint, the loading itself is DiffSynth's (`load_model`:
DiskMap, state-dict converter, VRAM wrappers), as for a released file. Tests and CI only.
"""
from __future__ import annotations


def load_component(spec: dict, entry, config: dict, vram_limit):
    """One file of a tiny folder, loaded as its marker's `spec` says (the class, or a tiny one of
    `tiny_model_class` where DiffSynth hard-codes the released widths), with the backend's VRAM `config`."""
    from diffsynth.core.loader import load_model
    from diffsynth.models.model_loader import ModelPool
    pool = ModelPool()
    tiny_class = "vae" if spec.get("tiny_vae") else spec.get("tiny_class")
    model_class = tiny_model_class(tiny_class) if tiny_class else pool.import_model_class(spec["model_class"])
    converter = pool.import_model_class(spec["state_dict_converter"]) if spec.get("state_dict_converter") else None
    return load_model(model_class, entry, spec.get("extra_kwargs", {}), config["computation_dtype"],
                      config["computation_device"], converter, use_disk_map=True, vram_config=config,
                      module_map=pool.fetch_module_map(spec["model_class"], config), vram_limit=vram_limit)


_TINY_CLASSES: dict = {}


def tiny_model_class(kind: str):
    """DiffSynth's classes (their forward passes, loading and VRAM wrappers) at tiny widths, for test
    folders only: the parts whose widths DiffSynth hard-codes to the released sizes. `vae`: WanVideoVAE
    around a VideoVAE_ of tiny width; `animate_adapter`: Wan2.2-Animate's adapter (pose embedding, face
    motion encoder, face blocks) at the tiny DiT's width; `audio_encoder`: Wan2.2-S2V's wav2vec2 encoder
    with its 24 layers (the S2V DiT weighs all 25 hidden states) but a tiny width."""
    if kind in _TINY_CLASSES:
        return _TINY_CLASSES[kind]
    if kind == "vae":
        from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

        class TinyWanVideoVAE(WanVideoVAE):
            def __init__(self, z_dim=16, dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1):
                super().__init__(z_dim=z_dim)  # under DiffSynth's loader this builds on the meta device
                self.model = VideoVAE_(dim=dim, z_dim=z_dim, dim_mult=list(dim_mult),
                                       num_res_blocks=num_res_blocks).eval().requires_grad_(False)
        _TINY_CLASSES[kind] = TinyWanVideoVAE
    elif kind == "animate_adapter":
        import torch
        from diffsynth.models.wan_video_animate_adapter import (FaceAdapter, FaceEncoder, Generator,
                                                                WanAnimateAdapter)

        class TinyWanAnimateAdapter(WanAnimateAdapter):
            def __init__(self, dim=24, num_heads=2, num_adapter_layers=1, face_size=4, z_dim=16):
                torch.nn.Module.__init__(self)  # the released sizes are hard-coded in WanAnimateAdapter's
                self.pose_patch_embedding = torch.nn.Conv3d(z_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
                self.motion_encoder = Generator(size=face_size, style_dim=512, motion_dim=20)
                self.face_adapter = FaceAdapter(heads_num=num_heads, hidden_dim=dim,
                                                num_adapter_layers=num_adapter_layers)
                self.face_encoder = FaceEncoder(in_dim=512, hidden_dim=dim, num_heads=1)
        _TINY_CLASSES[kind] = TinyWanAnimateAdapter
    elif kind == "audio_encoder":
        import torch
        from diffsynth.models.wav2vec import WanS2VAudioEncoder
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

        class TinyWanS2VAudioEncoder(WanS2VAudioEncoder):
            def __init__(self, hidden_size=16, conv_dim=8, num_hidden_layers=24):
                torch.nn.Module.__init__(self)
                self.model = Wav2Vec2ForCTC(Wav2Vec2Config(
                    hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=2,
                    num_hidden_layers=num_hidden_layers, conv_dim=[conv_dim] * 7, num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer",
                    vocab_size=33))
                self.video_rate = 30
        _TINY_CLASSES[kind] = TinyWanS2VAudioEncoder
    else:
        raise ValueError(f"no tiny class {kind!r}")
    return _TINY_CLASSES[kind]
