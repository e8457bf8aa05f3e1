"""Video input: decoding a generated mp4 and frame directories, bad files, preprocessing
against HF's image processor, and the prompt built for the model."""


import numpy as np
import pytest
import torch

from megatron_spava.video import (VideoPreprocessConfig, load_video, preprocess_frames, smart_resize,
                                  write_synthetic_video)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_synthetic_video(str(tmp_path_factory.mktemp("v") / "clip.mp4"), frames=24,
                                 height=96, width=128, fps=4)


def test_decode_and_sample_by_rate(mp4):
    clip = load_video(mp4, fps=2.0)
    assert clip.source_frames == 24 and clip.source_fps == pytest.approx(4.0)
    assert clip.frames.shape == (12, 96, 128, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == list(range(0, 24, 2)) and clip.fps == pytest.approx(2.0)
    assert clip.frames.std() > 10  # real picture content, not a blank decode


def test_sampled_frames_are_those_of_the_full_decode(mp4):
    every = load_video(mp4, fps=None)
    assert np.array_equal(load_video(mp4, fps=2.0).frames, every.frames[::2])
    capped = load_video(mp4, fps=None, max_frames=7)
    assert np.array_equal(capped.frames, every.frames[capped.indices])


def test_decode_all_frames_and_cap(mp4):
    assert load_video(mp4, fps=None).frames.shape[0] == 24
    capped = load_video(mp4, fps=None, max_frames=7)
    assert capped.frames.shape[0] == 6  # rounded down to the temporal patch (2)


def test_frames_directory(tmp_path, mp4):
    from PIL import Image
    frames = load_video(mp4, fps=None).frames
    for i, f in enumerate(frames[:10]):
        Image.fromarray(f).save(tmp_path / f"{i:03d}.png")
    clip = load_video(str(tmp_path), fps=None, frames_fps=5.0)
    assert clip.frames.shape[0] == 10 and clip.source_fps == 5.0
    assert np.array_equal(clip.frames, frames[:10])  # png is lossless


def test_bad_videos_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="video not found"):
        load_video(str(tmp_path / "missing.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01not a video" * 1000)
    with pytest.raises(ValueError, match="cannot decode video"):
        load_video(str(corrupt))
    empty = write_synthetic_video(str(tmp_path / "empty.mp4"), frames=0)
    with pytest.raises(ValueError, match="no frames|no video stream"):
        load_video(empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        load_video(str(tmp_path / "nothing"))


def test_smart_resize():
    assert smart_resize(96, 128, 28, 28 * 28 * 4, 28 * 28 * 64) == (84, 140)  # nearest multiples
    h, w = smart_resize(1080, 1920, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 768 * 28 * 28 and abs(w / h - 16 / 9) < 0.1
    h, w = smart_resize(20, 30, 28, 28 * 28 * 4, 28 * 28 * 64)
    assert h * w >= 28 * 28 * 4
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 1, 10 ** 9)


def test_patches_match_hf_image_processor():
    """An image is a 2-frame video of itself: with no resize needed, our video patches must
    equal HF's (PIL backend) image patches: same order, same normalisation."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    img = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    cfg = VideoPreprocessConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    ours, grid = preprocess_frames(np.stack([img, img]), cfg)
    hf = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    ref = hf(images=[img], return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=1e-5, atol=1e-5)


def test_odd_frame_count_repeats_the_last_frame():
    frames = np.random.default_rng(1).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    cfg = VideoPreprocessConfig(min_pixels=56 * 56, max_pixels=56 * 56)
    odd, grid = preprocess_frames(frames, cfg)
    even, _ = preprocess_frames(np.concatenate([frames, frames[-1:]]), cfg)
    assert grid.tolist() == [[2, 4, 4]] and torch.equal(odd, even)


def test_prompter_builds_the_video_prompt(tmp_path, mp4):
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_spava.models.qwen2_5_vl.tiny import make_tiny_checkpoint
    from megatron_spava.video.prompt import VideoPrompter
    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"))
    prompter = VideoPrompter(ckpt)
    clip = load_video(mp4, fps=2.0)
    inputs = prompter(clip, "What is happening in this video?")
    pad = prompter.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    t, h, w = inputs.video_grid_thw[0].tolist()
    assert int((inputs.input_ids == pad).sum()) == t * h * w // 4
    assert inputs.pixel_values_videos.shape == (t * h * w, 1176)
    assert float(inputs.second_per_grid_ts[0]) == pytest.approx(2 / clip.fps)
    text = prompter.tokenizer.decode(inputs.input_ids[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    cfg = Qwen25VLConfig.from_hf(ckpt)
    assert cfg.vision_end_token_id == prompter.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.query_length(inputs.input_ids) == len(prompter.tokenizer(
        "What is happening in this video?<|im_end|>\n<|im_start|>assistant\n")["input_ids"])


def _torchvision_available():
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _torchvision_available(), reason="HF's video processor needs torchvision")
def test_fallback_preprocessing_matches_hf_processor(tmp_path, mp4):
    from megatron_spava.models.qwen2_5_vl.tiny import make_tiny_checkpoint
    from megatron_spava.video.prompt import VideoPrompter
    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"))
    clip = load_video(mp4, fps=2.0)
    hf, ours = VideoPrompter(ckpt, use_hf_processor=True), VideoPrompter(ckpt, use_hf_processor=False)
    a, b = hf(clip, "Describe."), ours(clip, "Describe.")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.video_grid_thw, b.video_grid_thw)
    torch.testing.assert_close(b.pixel_values_videos, a.pixel_values_videos.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.second_per_grid_ts, a.second_per_grid_ts.float())
