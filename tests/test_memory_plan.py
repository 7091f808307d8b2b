"""`ddpo plan`: the memory plan of a run, computed on the meta device before anything loads
(ddpo/memory.py), and `ddpo train` refusing a layout that cannot fit."""

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from ddpo import memory
from ddpo.config import load_config
from ddpo.lora import attach_lora
from ddpo.memory import GIB, LEARNER_BYTES_PER_LORA_PARAM, PlanUnavailable, plan_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEVICE_KEYS = {"weights_bytes", "trainable_bytes", "activation_bytes", "total_bytes", "fits"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_has_a_plan(path):
    """Every shipped config plans from its model's configs alone (shipped for the hub models),
    and the plan is JSON with the figures per device."""
    config = load_config(path)
    plan = json.loads(json.dumps(plan_memory(config, device_memory_bytes=80 * GIB).to_json()))
    assert plan["devices"]
    for device in plan["devices"]:
        assert DEVICE_KEYS <= device.keys()
        assert device["fits"] in (True, False)
        assert device["weights_bytes"] > 0 and device["activation_bytes"] > 0
        assert device["total_bytes"] == (device["weights_bytes"] + device["trainable_bytes"]
                                         + device["prompt_cache_bytes"] + device["activation_bytes"])
    assert plan_memory(config).fits is None  # no device memory: unknown


def test_shipped_model_configs_have_the_published_sizes():
    """The shipped config.json files build the published models: their parameter counts."""
    counts = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": {"unet": 859_520_964, "vae": 83_653_863,
                                                        "text_encoder": 123_060_480},
        "stabilityai/stable-diffusion-xl-base-1.0": {"unet": 2_567_463_684, "text_encoder_2": 694_659_840},
        "black-forest-labs/FLUX.1-dev": {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656},
        "Qwen/Qwen-Image": {"transformer": 20_430_401_088, "text_encoder": 8_292_166_656},
    }
    for repo, expected in counts.items():
        model = memory.meta_model(repo, None, "bfloat16", 4, 4.0, ())
        for name, count in expected.items():
            base = [p for p in model.modules[name].parameters() if not p.requires_grad]  # not the LoRA
            assert sum(p.numel() for p in base) == count, (repo, name)
            assert all(p.dtype == torch.bfloat16 for p in base)


def test_shipped_wan_configs_have_the_published_sizes():
    """Wan 2.1 T2V 1.3B: the transformer of 1.42B parameters, UMT5-XXL's encoder and the video
    VAE; in bfloat16 but for the modules diffusers keeps in float32 (`_keep_in_fp32_modules`:
    the time embedder, the modulation tables, the cross-attention norms) and the VAE, which the
    family runs in float32 (`Wan.upcast`)."""
    model = memory.meta_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None, "bfloat16", 4, 4.0, ())
    counts = {"transformer": 1_418_996_800, "text_encoder": 5_680_910_336, "vae": 126_892_531}
    for name, count in counts.items():
        module = model.modules[name]
        kept = memory._keep_in_float32(module, torch.bfloat16)
        base = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        assert sum(p.numel() for p in base.values()) == count, name
        assert {n for n, p in base.items() if p.dtype == torch.float32} == {
            n for n in base if name == "vae" or any(k in n.split(".") for k in kept)}, name  # as diffusers matches them
        assert all(p.dtype in (torch.bfloat16, torch.float32) for p in base.values())


@pytest.mark.parametrize("pretrained", ["builtin:tiny", "builtin:digits-flow"])
def test_weights_are_the_real_parameters_bytes(pretrained):
    """The meta model's bytes per module are those of the pipeline load_pipeline really loads."""
    from ddpo.pipeline import load_pipeline

    config = load_config(None, [f"model.pretrained={pretrained}", "model.dtype=bfloat16", "sample.height=16",
                                "sample.width=16"])
    plan = plan_memory(config)
    real = load_pipeline(pretrained, dtype="bfloat16").pipe
    for name, weights in plan.devices[0].weights.items():
        module = getattr(real, name)
        assert weights == sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]), name


def test_lora_trainable_bytes_are_what_attach_lora_makes():
    from ddpo.pipeline import build_tiny_pipeline

    config = load_config(None, ["lora.rank=8", "train.algorithm=ddpo_is"])
    unet = build_tiny_pipeline().unet
    attach_lora(unet, 8, 8.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    plan = plan_memory(config)
    assert plan.lora_params == sum(p.numel() for p in trained)
    assert plan.devices[0].trainable_bytes == LEARNER_BYTES_PER_LORA_PARAM * plan.lora_params
    # DiffusionNFT's frozen old-policy copy: one float32 copy more
    nft = plan_memory(load_config(CONFIGS / "digits_flow_nft.yaml"))
    assert nft.devices[0].trainable_bytes == (LEARNER_BYTES_PER_LORA_PARAM + 4) * nft.lora_params


@pytest.mark.parametrize("path", ["tiny.yaml", "digits_flow.yaml"])
def test_gradient_checkpointing_keeps_less(path):
    device = plan_memory(load_config(CONFIGS / path)).devices[0]
    assert 0 < device.training_bytes_checkpointed < device.training_bytes_full
    on = plan_memory(load_config(CONFIGS / path, ["train.gradient_checkpointing=true"])).devices[0]
    assert on.training_bytes == on.training_bytes_checkpointed


def test_trace_is_the_same_with_the_op_cache_warm_or_cold():
    """Ops replayed from the shapes they gave before count as the ops themselves."""
    model = memory.meta_model("builtin:tiny", None, "float32", 4, 4.0, ())
    shapes = memory.Shapes(4, 16, 16, 77)
    warm = memory.training_bytes(model.family, model.denoiser, 4, shapes, False)
    memory._META_OUTPUTS.clear()
    assert memory.training_bytes(model.family, model.denoiser, 4, shapes, False) == warm


def test_live_bytes_counts_a_storage_once_and_frees_it():
    live = memory.LiveBytes()
    with live:
        a = torch.empty(256, device="meta")  # 1 KiB
        view = a.view(16, 16)  # same storage
        b = a * 2  # 1 KiB more
        del a, view
        c = b + 1  # a freed: still 2 KiB live at most
    del b, c
    assert live.peak() == 2048


def test_layouts_and_offload():
    config = load_config(CONFIGS / "sd35_pickscore.yaml",
                         ["cluster.layout=separate", "cluster.num_samplers=2", "cluster.num_learners=6"])
    plan = plan_memory(config)
    roles = [d.roles for d in plan.devices]
    assert roles == [[f"learner-{i}"] for i in range(6)] + [["sampler-0"], ["sampler-1"]]
    learner, sampler = plan.devices[0], plan.devices[-1]
    assert learner.sampling_bytes == 0 and sampler.training_bytes == 0
    assert sampler.trainable_bytes == 4 * plan.lora_params  # the LoRA alone, no gradients or AdamW
    offloaded = plan_memory(load_config(CONFIGS / "sd35_pickscore.yaml", ["model.offload_text_encoders=true"]))
    device = offloaded.devices[0]
    assert not any(name.startswith("text_encoder") for name in device.weights)
    assert device.startup_bytes > device.weights_bytes  # the encoders are there until the prompts are encoded


def test_unknown_hub_model_is_one_line(capsys):
    config = load_config(None, ["model.pretrained=no-such-org/no-such-model"])
    with pytest.raises(PlanUnavailable, match="plan a local diffusers folder"):
        plan_memory(config)
    assert main(["plan", "--set", "model.pretrained=no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpo: error: model.pretrained: no shipped configs for 'no-such-org/no-such-model'")
    assert "\n" not in err


def test_plan_json_from_the_command_line(capsys):
    assert main(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--gpu-memory", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device_memory_bytes"] == 80 * GIB and plan["fits"] is True
    assert DEVICE_KEYS <= plan["devices"][0].keys()
    assert main(["plan", "--config", str(CONFIGS / "sd35_pickscore.yaml"), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "NO" in out and "train.gradient_checkpointing" in out and "transformer" in out


def test_train_refuses_a_layout_that_cannot_fit_before_loading(capsys, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded a model or started Ray before the memory plan")

    monkeypatch.setattr("ddpo.pipeline.load_pipeline", must_not_run)
    monkeypatch.setattr("cluster.local.start_local_ray", must_not_run)
    args = ["train", "--config", str(CONFIGS / "tiny.yaml"), "--set", f"output_dir={tmp_path}"]
    assert main([*args, "--set", "cluster.device_memory_gb=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpo: error: memory plan: device 0 (worker: sampler-0 + learner-0) needs"), err
    assert "\n" not in err
    assert "train.gradient_checkpointing" in err and "train.batch_size" in err and "cluster.layout" in err


def test_train_plans_nothing_when_the_memory_is_unknown(monkeypatch):
    """A CPU run with no cluster.device_memory_gb: nothing to compare with, nothing refused."""
    from cluster.cli import check_memory

    monkeypatch.setattr("ddpo.memory.plan_memory", lambda *a, **k: pytest.fail("planned"))
    check_memory(load_config(CONFIGS / "tiny.yaml"), None)


def test_a_kl_to_the_reference_adds_its_forward_while_the_graph_is_held():
    plain = plan_memory(load_config(CONFIGS / "tiny.yaml")).devices[0]
    kl = plan_memory(load_config(CONFIGS / "tiny.yaml", ["train.kl_coef=0.01"])).devices[0]
    assert kl.training_bytes_full > plain.training_bytes_full


def test_a_clip_is_planned_for_its_latent_frames(tmp_path):
    """A video family's activations are those of its clips: sample.num_frames gives the latent
    frames (num_frames - 1) // 2 + 1 of the tiny Wan's VAE (2x in time; Wan's is 4x). Every
    tensor of the transformer is per token (fused attention holds no L x L scores), so a forward's
    peak is a + b * latent_frames, b a latent frame's tokens' bytes and a what no latent frame adds
    (the 8 text tokens', the timestep's): equal steps from 1 to 3 to 5 latent frames. Then 9
    frames (5 latent frames) against 5 (3) is (a + 5b) / (a + 3b) = 5/3 * (1 - 0.4 a / (a + 3b)):
    at 64 x 64 (a latent frame is 16 x 16 = 256 tokens) a is under 1% of the 3-frame peak, so the
    ratio is 5/3 within 0.4%; asserted within 1%."""
    from tests.tiny_families import build_tiny_wan

    build_tiny_wan().save_pretrained(tmp_path)
    plans = {frames: plan_memory(load_config(None, [f"model.pretrained={tmp_path}", f"sample.num_frames={frames}",
                                                    "sample.height=64", "sample.width=64",
                                                    "model.max_sequence_length=8"]))
             for frames in (1, 5, 9)}
    assert [plans[f].latent_shape for f in (1, 5, 9)] == [[4, 1, 32, 32], [4, 3, 32, 32], [4, 5, 32, 32]]
    device = {frames: plan.devices[0] for frames, plan in plans.items()}
    for phase in ("sampling_bytes", "training_bytes_full", "training_bytes_checkpointed"):
        one, three, five = (getattr(device[f], phase) for f in (1, 5, 9))
        assert five - three == pytest.approx(three - one, rel=1e-3), phase  # linear in latent frames
        assert one - (three - one) / 2 < 0.01 * three, phase  # a = peak(1) - b: under 1%
        assert five / three == pytest.approx(5 / 3, rel=0.01), phase
    # the decode of the 8 clips grows with them, and holds at least the decoded frames (float32)
    assert device[9].decode_bytes > device[5].decode_bytes > device[1].decode_bytes
    assert device[9].decode_bytes >= 8 * 3 * 9 * 64 * 64 * 4
    # the prompt cache holds text alone: the same for any clip length
    assert device[1].prompt_cache_bytes == device[9].prompt_cache_bytes > 0
    assert "clips: 9 frames, latents [4, 5, 32, 32]" in memory.describe(plans[9])


def test_the_video_table_is_the_plan_of_one_clip(tmp_path):
    """bench/video_plan.py, which makes docs/video.md's tables: a point is `ddpo plan` of
    configs/wan21_1_3b.yaml with one clip a batch (CFG: the clip twice in every forward), and its
    14B folder builds Wan 2.1's 14B transformer (14.29B parameters)."""
    from tests.conftest import load_script

    bench = load_script("bench/video_plan.py")
    row = bench.point(CONFIGS / "wan21_1_3b.yaml", 33, "240x416")
    assert (row["latents"], row["tokens"]) == ([9, 30, 52], 9 * 15 * 26)
    device = plan_memory(load_config(CONFIGS / "wan21_1_3b.yaml", bench.ONE_CLIP)).devices[0]
    assert (device.sampling_batch, device.training_batch, device.decode_batch) == (2, 2, 1)
    assert row["training_checkpointed_gib"] == round(device.training_bytes_checkpointed / GIB, 2)
    assert row["peak_gib"] < row["peak_no_ckpt_gib"] and row["fits H100 80GB"] and row["fits H200"]
    model = memory.meta_model(str(bench.wan_14b_folder(tmp_path)), None, "bfloat16", 4, 4.0, ())
    assert sum(p.numel() for p in model.modules["transformer"].parameters() if not p.requires_grad) == 14_288_491_584
