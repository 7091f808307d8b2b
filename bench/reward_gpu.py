"""The rewards on one GPU, at their real models' shapes with random weights: images scored per
second and peak memory, for sizing the reward pool against the samplers (how many sampler devices
one reward device keeps up with). Prints one JSON object.

    python bench/reward_gpu.py --device cuda [--max-seconds 400] [--out reward_gpu.json]
    python bench/reward_gpu.py --tiny --device cpu     # the same code on test-sized models (CI)

Each reward's model is built in code at the published architecture's widths and depths (below),
cast to `--dtype`, saved to a scratch folder, and loaded back through the reward's own class and
params (`rewards.load_reward`), as a downloaded folder would be; tokenizers are word-level ones
built in code (the token counts, not the vocabularies, set the cost). The images are random
512x512 (`--size`) uint8, the prompts short captions: the scores mean nothing, the time and
memory are the real models'.

  pickscore     CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: vision 32 layers x 1280,
                text 24 x 1024, projection 1024), 224 px; the reference the others compare with
  hpsv2         the same CLIP ViT-H/14 (HPSv2.1 is its fine-tune), through `rewards.hpsv2`
  image_reward  BLIP ViT-L/16 at 224 px (24 layers x 1024) + BERT-base with cross-attention
                (12 x 768) + ImageReward's MLP head, through `rewards.image_reward`
  ocr           TrOCR-base (microsoft/trocr-base-printed: ViT encoder 12 x 768 at 384 px, decoder
                12 x 1024), greedy, `--ocr-tokens` new tokens per image (random weights never stop
                early: every image decodes all of them, the worst case)
  vlm_judge     LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 576 image
                tokens, Llama 32 x 4096), one yes/no question per image, transformers backend:
                one forward per image and question, P(yes) from the last position's logits
  geneval       the same VLM asked GenEval's checks of the four prompts' metadata (colour,
                position, counting, two objects: 2, 3, 3 and 3 questions, 2.75 per image)

Phases run in that order; `--max-seconds` is checked before each (the rest are listed under
`skipped`), a phase that fails is listed under `errors` and the next ones still run, and with
`--out` the JSON is rewritten after every phase. Each phase reports its build and load seconds,
images/s over `--images` images scored in calls of `--batch` (after one warm-up call), and
`torch.cuda.max_memory_allocated` from the load to the end of scoring.

On the device machine (no diffusers or Ray needed: nothing here imports them):
    PYTHONUNBUFFERED=1 python3 bench/reward_gpu.py --device cuda --out $OUT/reward_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import load_reward  # noqa: E402

WORDS = ("a an the of in on with and is are image photo picture cat dog bear fish car bench red blue "
         "green yellow two three left right does show exactly there any this yes no Yes No USER ASSISTANT "
         "answer question : ? . ,").split()
PROMPTS = ["a photo of a red car", "a dog left of a cat", "two blue benches", "a green bear with a fish"]

# the published architectures (REAL, with their vocabularies' sizes) and test-sized stand-ins
# (TINY, with the word-level tokenizers' own), as config keyword arguments
REAL = {
    "clip_h": {"text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            max_position_embeddings=77),
               "vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14),
               "projection_dim": 1024, "vocab_size": 49408},
    "blip_l": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=16),
               "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            encoder_hidden_size=1024, max_position_embeddings=512)},
    "trocr_base": {"encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=384, patch_size=16),
                   "decoder": dict(d_model=1024, decoder_layers=12, decoder_attention_heads=16, decoder_ffn_dim=4096,
                                   max_position_embeddings=512), "vocab_size": 50265},
    "llava_7b": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14),
                 "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, max_position_embeddings=4096), "vocab_size": 32064},
}
TINY = {
    "clip_h": {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77),
               "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8),
               "projection_dim": 16},
    "blip_l": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8),
               "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, max_position_embeddings=64)},
    "trocr_base": {"encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
                   "decoder": dict(d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
                                   max_position_embeddings=64)},
    "llava_7b": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8),
                 "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=1024)},
}


def word_tokenizer(specials: list[str], template: str | None = None, max_length: int = 77, **tokens):
    """A word-level fast tokenizer over WORDS (what the cost depends on is the token count)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tokens.get("unk_token", specials[0])))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    if template is not None:
        first, last = template.split(" $A ")
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(first, vocab[first]), (last, vocab[last])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **tokens)


def build_clip(size: dict, folder: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """CLIP ViT-H/14's shape in `model/`, its tokenizer and image processor in `processor/`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = word_tokenizer(["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"],
                               "<|startoftext|> $A <|endoftext|>", bos_token="<|startoftext|>",
                               eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder / "processor")
    image = size["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(
        folder / "processor")
    config = CLIPConfig(text_config=dict(size["text"], vocab_size=size.get("vocab_size", len(tokenizer)), bos_token_id=0, eos_token_id=1, pad_token_id=2),
                        vision_config=size["vision"], projection_dim=size["projection_dim"])
    with torch.device(device):
        CLIPModel(config).to(dtype).save_pretrained(folder / "model")
    return {"model": str(folder / "model"), "processor": str(folder / "processor")}


def build_trocr(size: dict, folder: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """TrOCR-base's shape with its processor in one folder."""
    from transformers import (RobertaTokenizer, TrOCRConfig, TrOCRProcessor, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    try:  # the PIL image processor, which needs no torchvision (transformers 5.18 on)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    characters = sorted(set("".join(WORDS)) | set(" "))
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *characters])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[])
    image = size["encoder"]["image_size"]
    encoder = ViTConfig(**size["encoder"])
    decoder = TrOCRConfig(vocab_size=size.get("vocab_size", len(vocab)), **size["decoder"], bos_token_id=0, pad_token_id=1, eos_token_id=2,
                          decoder_start_token_id=2)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    with torch.device(device):
        model = VisionEncoderDecoderModel(config)
        with torch.no_grad():  # random logits would often end at once: never end, the worst case
            model.decoder.output_projection.weight[2] = 0.0
            model.decoder.output_projection.weight[2, 0] = -1e4
        model.to(dtype).save_pretrained(folder)
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": image, "width": image}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return {"model": str(folder)}


def build_blip(size: dict, folder: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """ImageReward's BLIP (`rewards.image_reward.image_reward_config` at REAL) and head, written as
    the reward's `model` folder, with a BERT tokenizer plus BLIP's [DEC] and [ENC]."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipConfig

    from rewards.image_reward import ImageRewardModel, image_reward_config

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *dict.fromkeys(w.lower() for w in WORDS)]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if size is REAL["blip_l"]:
        config = image_reward_config()
    else:
        config = BlipConfig(vision_config=size["vision"], text_config=dict(size["text"], vocab_size=len(tokenizer),
                                                                          is_decoder=True))
    with torch.device(device):
        model = ImageRewardModel(config)
    config.save_pretrained(folder)
    save_file({k: v.to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    tokenizer.save_pretrained(folder)
    return {"model": str(folder)}


def build_llava(size: dict, folder: Path, device: torch.device, dtype: torch.dtype) -> str:
    """LLaVA-1.5-7B's shape with its processor in one folder; returns the folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = word_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], max_length=4096, unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(**size["vision"])
    patches = (vision.image_size // vision.patch_size) ** 2
    text = LlamaConfig(vocab_size=size.get("vocab_size", len(tokenizer)), **size["text"], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=patches,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.device(device):
        LlavaForConditionalGeneration(config).to(dtype).save_pretrained(folder)
    image = vision.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    return str(folder)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_phase(name: str, params: dict, args, device: torch.device, built_s: float) -> dict:
    """Load the reward through the registry, warm up once, then time `args.images` images."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    reward = load_reward(name, params)
    synchronize(device)
    loaded_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    metadata = [METADATA[p] for p in prompts]
    reward(images[:args.batch], prompts[:args.batch], metadata[:args.batch])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    scores = []
    for first in range(0, args.images, args.batch):
        end = first + args.batch
        scores.append(np.asarray(reward(images[first:end], prompts[first:end], metadata[first:end])[0]))
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    scores = np.concatenate(scores)
    del reward
    return {"build_s": built_s, "load_s": loaded_s, "images": args.images, "score_s": seconds,
            "images_per_s": args.images / seconds, "peak_gib": peak, "scores_finite": bool(np.isfinite(scores).all())}


# the prompts' metadata: GenEval's checks (geneval's) and a text to read (ocr's); the others ignore it
METADATA = {
    "a photo of a red car": {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}]},
    "a dog left of a cat": {"tag": "position", "include": [{"class": "cat", "count": 1},
                                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]},
    "two blue benches": {"tag": "counting", "include": [{"class": "bench", "count": 2, "color": "blue"}],
                         "exclude": [{"class": "bench", "count": 3}]},
    "a green bear with a fish": {"tag": "two_object", "include": [{"class": "bear", "count": 1, "color": "green"},
                                                                  {"class": "fish", "count": 1}]},
}
for _metadata in METADATA.values():
    _metadata["text"] = "OPEN"  # the ocr reward's target


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="test-sized models (CI)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="the images' height and width")
    parser.add_argument("--ocr-tokens", type=int, default=16)
    parser.add_argument("--phases", default="pickscore,hpsv2,image_reward,ocr,vlm_judge,geneval")
    parser.add_argument("--max-seconds", type=float)
    parser.add_argument("--workdir", help="scratch folder for the saved models (default: a temp dir)")
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = TINY if args.tiny else REAL
    started = time.perf_counter()
    import transformers

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")} | {"tiny": args.tiny},
              "phases": {}, "errors": {}, "skipped": {}}
    common = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch}
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        scratch = Path(scratch)
        built: dict[str, tuple[object, float]] = {}

        def model(kind: str, build):
            if kind not in built:
                start = time.perf_counter()
                built[kind] = (build(size[kind], scratch / kind, device, dtype), time.perf_counter() - start)
            return built[kind]

        def vlm_params(question_key: str, extra: dict) -> tuple[dict, float]:
            folder, seconds = model("llava_7b", build_llava)
            return {"model": folder, "backend": "transformers", **common, **extra}, seconds

        phases = {
            "pickscore": lambda: (lambda p, s: ({**p, **common}, s))(*model("clip_h", build_clip)),
            "hpsv2": lambda: (lambda p, s: ({**p, **common}, s))(*model("clip_h", build_clip)),
            "image_reward": lambda: (lambda p, s: ({**p, **common}, s))(*model("blip_l", build_blip)),
            "ocr": lambda: (lambda p, s: ({**p, **common, "max_new_tokens": args.ocr_tokens}, s))(
                *model("trocr_base", build_trocr)),
            "vlm_judge": lambda: vlm_params("q", {"question": "Does this image show {prompt}?"}),
            "geneval": lambda: vlm_params("g", {}),
        }
        for name in args.phases.split(","):
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                result["skipped"][name] = f"past --max-seconds {args.max_seconds:g}"
                continue
            try:
                params, built_s = phases[name]()
                result["phases"][name] = score_phase(name, params, args, device, built_s)
            except Exception as err:  # noqa: BLE001 - recorded, and the next phase runs
                result["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    result["total_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
