"""Stage-2 conditioning: ROI-map and flux inputs of the DiT, condition dropout, classifier-free guidance, the
condition channels of latent batches, config rules and user mask files."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import tifffile
import torch

from cadiff.config import compose
from cadiff.data import conditioning as C
from cadiff.errors import ConfigError, DataError, ModelError
from cadiff.models.dit import DiT
from cadiff.models.registry import build_model

LATENT = (4, 3, 8, 8)  # C, T, H, W


def model(*overrides: str, conditions=("roi_mask", "flux")):
    cfg = compose("train_latent", ["experiment=dit_tiny", "model.in_channels=4", *overrides]).model
    cfg.conditions = list(conditions)
    net = build_model(cfg)
    with torch.no_grad():  # leave the zero init so the conditions change the output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def batch(b: int = 3, mask_value: float = 1.0, flux: float = 0.5) -> torch.Tensor:
    z = torch.randn(b, *LATENT)
    mask = torch.zeros(b, 1, *LATENT[1:])
    mask[..., 2:5, 2:5] = mask_value
    return torch.cat([z, mask, torch.full((b, 1, *LATENT[1:]), flux)], dim=1)


def test_dit_takes_mask_channel_and_flux_embedding():
    torch.manual_seed(0)
    dit = DiT(4, 32, 1, 2, cond_mask=True, cond_flux=True)
    assert dit.x_embedder.proj.in_channels == 5
    x, t = torch.randn(2, *LATENT), torch.rand(2)
    out = dit(x, t, roi_mask=torch.rand(2, 8, 8), flux=torch.tensor([0.2, math.nan]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ModelError, match=r"ROI mask of shape \(2, 4, 4\): expected \[B, H, W\] = \[2, 8, 8\]"):
        dit(x, t, roi_mask=torch.rand(2, 4, 4))
    with pytest.raises(ModelError, match="cond_mask=false"):
        DiT(4, 32, 1, 2)(x, t, roi_mask=torch.rand(2, 8, 8))


def test_conditions_change_the_prediction_and_nan_means_null():
    torch.manual_seed(0)
    net = model("model.cond_mask=true", "model.cond_flux=true").dit
    x, t = torch.randn(2, *LATENT), torch.rand(2)
    mask = torch.zeros(2, 8, 8)
    with torch.no_grad():
        null = net(x, t)
        explicit_null = net(x, t, roi_mask=torch.full((2, 8, 8), math.nan), flux=torch.full((2,), math.nan))
        with_mask = net(x, t, roi_mask=mask)
        with_flux = net(x, t, flux=torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(null, explicit_null)
    # an empty mask is a condition ("no cells here"), not the same as no mask
    assert not torch.allclose(null, with_mask) and not torch.allclose(null, with_flux)


def test_split_batch_routes_channels_by_name():
    net = model("model.cond_mask=true", "model.cond_flux=true")
    x = batch(mask_value=1.0, flux=0.25)
    z, cond = net.split_batch(x)
    torch.testing.assert_close(z, x[:, :4])
    assert cond["roi_mask"].shape == (3, 8, 8) and cond["roi_mask"][0, 3, 3] == 1 and cond["roi_mask"][0, 0, 0] == 0
    assert cond["flux"].tolist() == [0.25] * 3
    only_mask = model("model.cond_mask=true")
    assert set(only_mask.split_batch(x)[1]) == {"roi_mask"}  # flux channel present but unused
    unconditional = model()
    assert unconditional.split_batch(x)[1] == {}
    with pytest.raises(ModelError, match="condition channels"):
        unconditional.split_batch(x[:, :5])


def test_condition_dropout_rate_and_train_only():
    net = model("model.cond_mask=true", "model.cond_flux=true", "model.cond_dropout=0.3")
    conds = {"roi_mask": torch.zeros(4000, 2, 2), "flux": torch.zeros(4000)}
    dropped = net.drop_conditions(conds, torch.Generator().manual_seed(0))
    frac_mask = torch.isnan(dropped["roi_mask"][:, 0, 0]).float().mean().item()
    frac_flux = torch.isnan(dropped["flux"]).float().mean().item()
    assert frac_mask == pytest.approx(0.3, abs=0.03) and frac_flux == pytest.approx(0.3, abs=0.03)
    # whole maps are dropped, never single pixels
    assert (torch.isnan(dropped["roi_mask"]).flatten(1).all(1) == torch.isnan(dropped["roi_mask"][:, 0, 0])).all()
    # eval mode (validation loss) sees every condition: the same loss as without dropout
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    x = batch()
    net.eval()
    loss_a, _ = net.training_loss(x, g())
    net.cond_dropout = 0.0
    loss_b, _ = net.training_loss(x, g())
    assert loss_a == loss_b
    net.cond_dropout = 0.3
    net.train()
    loss_c, _ = net.training_loss(x, g())
    assert torch.isfinite(loss_c)
    loss_c.backward()
    assert net.dit.mask_flag.weight.grad is not None and net.dit.flux_null.grad is not None


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    torch.manual_seed(0)
    net = model("model.cond_mask=true", "model.cond_flux=true").eval()
    conds = {"roi_mask": torch.zeros(2, 8, 8), "flux": torch.tensor([0.4, 0.6])}
    conds["roi_mask"][:, 2:6, 2:6] = 1
    shape = (2, *LATENT)

    def draw(**kw):
        return net.sample(shape, sampler="euler", num_steps=3, generator=torch.Generator().manual_seed(5), **kw)

    def by_hand(scale: float, null: dict | None = None) -> torch.Tensor:  # the guided Euler loop written out
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        grid = torch.linspace(1, 0, 4)
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((2,), float(t0))
            with torch.no_grad():
                v_c, v_u = net.dit(x, t, **conds), net.dit(x, t, **(null or {}))
            x = x + (t1 - t0) * (v_u + scale * (v_c - v_u))
        return x

    conditional = draw(conditions=conds)
    torch.testing.assert_close(draw(conditions=conds, guidance_scale=1.0), conditional)
    torch.testing.assert_close(draw(conditions=conds, guidance_scale=0.0), draw())
    torch.testing.assert_close(conditional, by_hand(1.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(draw(conditions=conds, guidance_scale=2.5), by_hand(2.5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conditional, draw())
    # the mask guided at a held flux: the null branch keeps the flux, drops the mask only
    held = by_hand(2.5, {"flux": conds["flux"]})
    torch.testing.assert_close(draw(conditions=conds, guidance_scale=2.5, guided=["roi_mask"]), held, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(held, by_hand(2.5), atol=1e-4)
    torch.testing.assert_close(draw(conditions=conds, guidance_scale=0.0, guided=["roi_mask"]),
                               draw(conditions={"flux": conds["flux"]}))
    with pytest.raises(ModelError, match="guidance_scale = -1"):
        draw(conditions=conds, guidance_scale=-1.0)


def fit_toy(condition: str, make_batch, steps: int = 200, overrides: tuple[str, ...] = ()):
    """A 1-block, 64-wide DiT fitted to toy latents ``[16, 1, 3, 8, 8]`` by ``make_batch(generator) -> (z, channel)``."""
    torch.manual_seed(0)
    cfg = compose("train_latent", ["experiment=dit_tiny", "model.in_channels=1", "model.hidden_size=64",
                                   "model.depth=1", "model.num_heads=2", "model.cond_dropout=0.2",
                                   f"model.cond_{'mask' if condition == 'roi_mask' else 'flux'}=true",
                                   *overrides]).model
    cfg.conditions = [condition]
    net = build_model(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        z, channel = make_batch(g)
        loss, _ = net.training_loss(torch.cat([z + 0.1 * torch.randn(z.shape, generator=g), channel], dim=1), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def toy_draw(net, scale: float = 1.0, **conditions) -> torch.Tensor:
    return net.sample((4, 1, 3, 8, 8), num_steps=10, generator=torch.Generator().manual_seed(1),
                      conditions=conditions, guidance_scale=scale)[:, 0]


def test_a_tiny_dit_learns_to_follow_the_mask():
    def squares(g):  # +1 inside a random 4x4 ROI square, -1 outside (~5 s for 200 steps on one thread)
        mask = torch.zeros(16, 8, 8)
        for i, (y, x) in enumerate(torch.randint(0, 5, (16, 2), generator=g).tolist()):
            mask[i, y: y + 4, x: x + 4] = 1
        grid = mask[:, None, None].expand(16, 1, 3, 8, 8)
        return 2 * grid - 1, grid

    net = fit_toy("roi_mask", squares)
    square, empty = torch.zeros(4, 8, 8), torch.zeros(4, 8, 8)
    square[:, :4, :4] = 1

    def inside_outside(out):
        return out[..., :4, :4].mean().item(), out[..., 4:, 4:].mean().item()

    inside, outside = inside_outside(toy_draw(net, roi_mask=square))
    assert inside > 0.7 and outside < -0.7
    assert max(inside_outside(toy_draw(net, roi_mask=empty))) < -0.5  # null test: an empty mask draws no "cell" (+1)
    free_inside, free_outside = inside_outside(toy_draw(net, 0.0, roi_mask=square))  # unconditional
    assert free_inside - free_outside < 0.5 * (inside - outside)


def _half_blocks(top: torch.Tensor, subgrid: int) -> torch.Tensor:
    """ROI maps ``[N, 16, 16]`` whose 2x2-pixel blocks have their top row inside an ROI where ``top [N, 8, 8]``,
    else their bottom row (half of every block either way), as the DiT's ``mask_subgrid`` planes ``[N, s^2, 8, 8]``."""
    rows = top.repeat_interleave(2, dim=2).float()
    pixels = torch.stack([rows, 1 - rows], dim=2).reshape(len(top), 16, 16)  # row 2y: top half of block row y
    return torch.from_numpy(np.stack([C.mask_planes(p.numpy(), (8, 8), subgrid) for p in pixels]))


@pytest.mark.parametrize("subgrid", [1, 2])
def test_mask_subgrid_planes_tell_the_dit_where_inside_a_latent_pixel_the_cells_lie(subgrid):
    """The latent is +1 where a latent pixel's block has its top row inside an ROI and -1 where its bottom row is.
    One ROI fraction per latent pixel (mask_subgrid=1) reads 0.5 everywhere and cannot tell them apart; the 2x2
    sub-block planes of model.mask_subgrid=2 can."""
    def halves(g):
        top = torch.rand(16, 8, 8, generator=g) < 0.5
        planes = _half_blocks(top, subgrid)
        return ((2 * top.float() - 1)[:, None, None].expand(16, 1, 3, 8, 8),
                planes[:, :, None].expand(16, subgrid * subgrid, 3, 8, 8))

    net = fit_toy("roi_mask", halves, overrides=(f"model.mask_subgrid={subgrid}",))
    assert net.dit.x_embedder.proj.in_channels == 1 + subgrid * subgrid
    top = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(7)) < 0.5
    out = toy_draw(net, roi_mask=_half_blocks(top, subgrid))
    agreement = ((out > 0) == top[:, None]).float().mean().item()
    if subgrid == 2:
        assert agreement > 0.9, agreement
    else:
        assert agreement < 0.7, agreement  # chance: the map carries no sign


def test_condition_channels_stack_the_mask_planes_then_the_flux():
    mask = np.zeros((16, 16), bool)
    mask[0, :2] = True  # the top-left pixel pair of latent pixel (0, 0): its top-left sub-block with subgrid 2
    meta = {"roi_mask": C.encode_mask(mask), "flux": 10.0}
    out = C.condition_channels(meta, ["roi_mask", "flux"], (4, 3, 4, 4), "clip k", mask_subgrid=2)
    assert out.shape == (4 + 1, 3, 4, 4) and C.condition_width("roi_mask", 2) == 4 and C.condition_width("flux", 2) == 1
    assert out[0, :, 0, 0].tolist() == [0.5] * 3 and out[1:4, :, 0, 0].sum() == 0 and out[:4, :, 1:, 1:].sum() == 0
    assert (out[4] == np.float32(C.flux_value(10.0))).all()
    np.testing.assert_allclose(out[:4].mean(axis=0), C.condition_channels(meta, ["roi_mask"], (4, 3, 4, 4), "k")[0])
    absent = C.condition_channels({}, ["roi_mask", "flux"], (4, 3, 4, 4), "clip k", mask_subgrid=2)
    assert absent.shape == (5, 3, 4, 4) and np.isnan(absent).all()
    with pytest.raises(DataError, match="mask_subgrid 8"):
        C.condition_channels(meta, ["roi_mask"], (4, 3, 4, 4), "clip k", mask_subgrid=8)


def test_a_tiny_dit_learns_to_follow_the_flux():
    def levels(g):  # the latent level is 4 (f - 1/2) for the flux value f in [0, 1]
        f = torch.rand(16, generator=g)
        return (4 * (f - 0.5)).view(16, 1, 1, 1, 1).expand(16, 1, 3, 8, 8), f.view(16, 1, 1, 1, 1).expand(16, 1, 3, 8, 8)

    net = fit_toy("flux", levels)
    for f in (0.2, 0.5, 0.8):
        assert toy_draw(net, flux=torch.full((4,), f)).mean().item() == pytest.approx(4 * (f - 0.5), abs=0.3)


def test_unconditional_model_config_still_builds_and_samples():
    # an export from before conditioning: no cond_* keys, no condition channels
    cfg = compose("train_latent", ["experiment=dit_tiny", "model.in_channels=4"]).model
    plain = {k: v for k, v in dict(cfg).items() if not k.startswith("cond_") and k != "conditions"}
    net = build_model(plain)
    assert net.dit.mask_flag is None and net.dit.flux_embedder is None and net.condition_names == []
    assert net.sample((1, *LATENT), num_steps=2).shape == (1, *LATENT)
    loss, _ = net.training_loss(torch.randn(2, *LATENT))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------
# data side


def test_mask_record_round_trip_crop_and_grid():
    mask = np.zeros((12, 16), bool)
    mask[2:6, 4:8] = True
    record = C.encode_mask(mask)
    json.dumps(record)
    np.testing.assert_array_equal(C.decode_mask(record), mask)
    cropped = C.crop_meta_mask({"source": "s", "roi_mask": record}, 2, 4, 8, 8, "clip k")
    np.testing.assert_array_equal(C.decode_mask(cropped["roi_mask"]), mask[2:10, 4:12])
    grid = C.mask_planes(mask, (3, 4))  # 4x4 blocks: rows 2:6 cover half of block rows 0 and 1
    np.testing.assert_array_equal(grid, [[[0, 0.5, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 0]]])
    with pytest.raises(DataError, match="not a whole multiple of the latent grid"):
        C.mask_planes(mask, (5, 4))
    with pytest.raises(DataError, match="clip k roi_mask: expected"):
        C.decode_mask({"shape": [12, 16], "bits": "AAAA"}, "clip k roi_mask")


def test_condition_channels_nan_when_absent():
    meta = {"roi_mask": C.encode_mask(np.ones((8, 8), bool)), "flux": 1.0}
    ch = C.condition_channels(meta, ["roi_mask", "flux"], (4, 3, 4, 4), "k")
    assert ch.shape == (2, 3, 4, 4) and (ch[0] == 1).all() and np.allclose(ch[1], 0.5)
    empty = C.condition_channels({}, ["roi_mask", "flux"], (4, 3, 4, 4), "k")
    assert np.isnan(empty).all()


def test_flux_scale_and_its_range():
    assert C.flux_value(1e-3) == 0.0 and C.flux_value(1.0) == 0.5 and C.flux_value(1e3) == 1.0
    with pytest.raises(ConfigError, match=r"flux = 0.0: expected mean photons"):
        C.flux_value(0.0)
    assert C.clip_flux(np.zeros((2, 2))) == 1e-3


def test_load_mask_formats(tmp_path):
    m = np.zeros((16, 16), bool)
    m[3:7, 3:7] = True
    np.save(tmp_path / "m.npy", m)
    np.save(tmp_path / "stack.npy", np.stack([m, m.T]).astype(np.uint8))
    tifffile.imwrite(tmp_path / "m.tif", m.astype(np.uint8) * 255)
    (tmp_path / "regions.json").write_text(json.dumps([{"coordinates": np.argwhere(m).tolist()}]))
    np.savez(tmp_path / "truth.npz", rois=np.stack([m, np.zeros_like(m)]), spikes=np.zeros((2, 5)))
    for name in ("m.npy", "m.tif", "regions.json", "truth.npz"):
        np.testing.assert_array_equal(C.load_mask(tmp_path / name, (16, 16)), m)
    np.testing.assert_array_equal(C.load_mask(tmp_path / "stack.npy", (16, 16)), m | m.T)


def test_load_mask_errors_name_the_file(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((8, 8)))
    np.save(tmp_path / "nan.npy", np.full((16, 16), np.nan))
    np.save(tmp_path / "str.npy", np.array([["a"] * 16] * 16))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    (tmp_path / "regions.json").write_text("{oops")
    (tmp_path / "outside.json").write_text(json.dumps([{"coordinates": [[1, 1], [20, 3]]}]))
    np.savez(tmp_path / "norois.npz", spikes=np.zeros((2, 5)))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    cases = {
        "norois.npz": r"norois.npz: no 'rois' array \(has \['spikes'\]\); expected the ground truth of a jobs/export.py",
        "bad.npz": r"bad.npz: not a readable .npz",
        "small.npy": r"small.npy: shape \(8, 8\), expected \[H, W\] or \[N, H, W\] with H, W = \(16, 16\)",
        "nan.npy": r"nan.npy: dtype float64, expected finite",
        "str.npy": r"str.npy: dtype <U1, expected finite",
        "bad.npy": r"bad.npy: not a readable .npy",
        "bad.tif": r"bad.tif: not a readable TIFF",
        "regions.json": r"regions.json: expected a JSON list",
        "outside.json": r"outside.json: 1 ROI pixels lie outside the sample's frame \(16, 16\) \(first \[row, col\] = \[20, 3\]\)",
        "missing.npy": r"missing.npy: not found",
        "mask.png": r"mask.png: suffix '.png'",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            C.load_mask(tmp_path / name, (16, 16))


def test_config_rules_for_conditioning():
    cfg = compose("train_latent", ["experiment=dit_tiny"])
    assert cfg.model.cond_mask is False and cfg.model.cond_flux is False and 0 <= cfg.model.cond_dropout < 1
    with pytest.raises(ConfigError, match="model.cond_dropout' = 1.0: expected a probability in \\[0, 1\\)"):
        compose("train_latent", ["model.cond_dropout=1.0"])
    with pytest.raises(ConfigError, match="model.conditions"):
        compose("train_latent", ["model.conditions=[gain]"])
    ok = compose("sample", ["stage2=x", "mask=rois.npy", "flux=0.2", "guidance_scale=2"])
    assert ok.mask == "rois.npy" and ok.flux == 0.2 and ok.guidance_scale == 2
    for override, message in (("guidance_scale=-0.5", "guidance_scale"), ("flux=0", "'flux' = 0"),
                              ("mask=rois.png", "'mask' = 'rois.png'")):
        with pytest.raises(ConfigError, match=message):
            compose("sample", ["stage2=x", override])
    with pytest.raises(ConfigError, match="mode=reconstruct"):
        compose("sample", ["mode=reconstruct", "stage1=x", "mask=a.npy"])


# ---------------------------------------------------------------------------------------------------------
# the conditions through prepare_data, encode_latents' meta, the latent pipeline and the sample job


def test_prepare_stores_the_roi_map_cropped_like_each_clip(tmp_path):
    from cadiff.data.shards import iter_shard, read_index
    from cadiff.data.simulate import simulate_movie
    from cadiff.testing.data import SIM_DATA_OVERRIDES, prepare_sim

    out = tmp_path / "sim"
    prepare_sim(out, "source.num_movies=2", "clip.height=16", "clip.width=16")
    src = compose("prepare_data", [*SIM_DATA_OVERRIDES, f"out={out}"]).source
    index = read_index(out)
    seen = 0
    for split in index["splits"].values():
        for shard in split["shards"]:
            for _key, _clip, meta in iter_shard(out / shard["path"]):
                seed = src.seed + int(meta["source"].split("-")[1])
                _, truth = simulate_movie(src.preset, frames=src.frames, height=src.height, width=src.width,
                                          num_neurons=src.num_neurons, seed=seed, rate_hz=src.rate_hz)
                y0, x0 = meta["y0"], meta["x0"]
                expected = truth.rois.any(axis=0)[y0: y0 + 16, x0: x0 + 16]
                np.testing.assert_array_equal(C.decode_mask(meta["roi_mask"]), expected)
                seen += 1
    assert seen == sum(s["num_clips"] for s in index["splits"].values()) > 0


def test_latent_meta_crops_the_mask_and_measures_flux():
    from cadiff.inference.encode import latent_meta

    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    calib = {"calibration": "photon_transfer", "gain": 2.0, "offset": 100.0, "read_noise": 1.0}
    clip = np.full((5, 16, 16), 100 + 2 * 3, np.uint16)  # 3 photons everywhere
    cropped = clip[:, 4:12, 4:12]
    meta = latent_meta({"source": "s", "roi_mask": C.encode_mask(mask)}, clip.shape, cropped, calib,
                       {"kind": "photon", "center": 0.0, "scale": 1.0})
    np.testing.assert_array_equal(C.decode_mask(meta["roi_mask"]), mask[4:12, 4:12])
    assert meta["flux"] == pytest.approx(3.0)
    raw = latent_meta({"source": "s"}, clip.shape, cropped, {"calibration": "none"}, {"kind": "raw", "center": 0.0,
                                                                                        "scale": 1.0})
    assert raw == {"source": "s"}  # no ROIs, no photon scale: no conditions


def test_latent_transform_appends_condition_channels():
    from cadiff.data.pipeline import LatentTransform, make_transform

    index = {"channel_mean": [1.0, 0.0], "channel_std": [2.0, 1.0], "conditioning": ["roi_mask", "flux"]}
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    latent = np.ones((2, 3, 4, 4), np.float32)
    x = LatentTransform(index)(latent, {"source": "s", "roi_mask": C.encode_mask(mask), "flux": 10.0})
    assert x.shape == (4, 3, 4, 4) and (x[0] == 0).all() and (x[1] == 1).all()
    np.testing.assert_array_equal(x[2, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert np.allclose(x[3], C.flux_value(10.0))
    assert np.isnan(LatentTransform(index)(latent, {"source": "s"})[2:]).all()
    assert LatentTransform({**index, "conditioning": []})(latent, {"source": "s"}).shape == (2, 3, 4, 4)
    # latents.mask_subgrid=2: the map as 4 sub-block planes (each latent pixel covers 2x2 pixels here)
    planes = LatentTransform(index, mask_subgrid=2)(latent, {"source": "s", "roi_mask": C.encode_mask(mask), "flux": 10.0})
    assert planes.shape == (2 + 4 + 1, 3, 4, 4) and np.allclose(planes[6], C.flux_value(10.0))
    np.testing.assert_array_equal(planes[2:6, 0], C.mask_planes(mask, (4, 4), 2))
    cfg = compose("train_latent", ["latents.mask_subgrid=2"]).latents
    assert make_transform({**index, "kind": "latents"}, cfg, train=True).mask_subgrid == 2


def test_train_latent_refuses_a_condition_the_latents_lack(tmp_path):
    from cadiff.train.stage import check_conditions

    cfg = compose("train_latent", ["model.cond_mask=true", "model.cond_flux=true"]).model
    assert check_conditions(cfg, {"conditioning": ["roi_mask", "flux"]}, tmp_path) == ["roi_mask", "flux"]
    with pytest.raises(ConfigError, match=r"'model.cond_mask' = true: latents.root .* carries no 'roi_mask'"):
        check_conditions(cfg, {}, tmp_path)
    with pytest.raises(ConfigError, match=r"'model.cond_flux' = true: .* no 'flux'"):
        check_conditions(cfg, {"conditioning": ["roi_mask"]}, tmp_path)


def test_mask_subgrid_follows_the_latents_and_divides_the_stage1_block():
    from cadiff.train.stage import check_mask_subgrid

    cfg = compose("train_latent", ["model.cond_mask=true", "latents.mask_subgrid=4"])
    assert check_mask_subgrid(cfg, 8, ["roi_mask"]) == 4  # the resolved model.mask_subgrid
    with pytest.raises(ConfigError, match=r"latents.mask_subgrid = 4: expected a divisor of the stage-1 spatial "
                                          r"downsample 2"):
        check_mask_subgrid(cfg, 2, ["roi_mask"])
    assert check_mask_subgrid(cfg, 2, ["flux"]) == 4  # latents without an ROI map: nothing to divide
    mismatch = compose("train_latent", ["model.cond_mask=true", "latents.mask_subgrid=4", "model.mask_subgrid=2"])
    with pytest.raises(ConfigError, match=r"model.mask_subgrid = 2: expected null or latents.mask_subgrid \(4\)"):
        check_mask_subgrid(mismatch, 8, ["roi_mask"])
    for override in ("latents.mask_subgrid=3", "model.mask_subgrid=6"):
        with pytest.raises(ConfigError, match=r"mask_subgrid' = [36]: expected a power of 2"):
            compose("train_latent", [override])


def test_sample_checks_requested_conditions_against_the_model(tmp_path, caplog):
    from cadiff.inference.sample import requested_conditions

    mask = np.zeros((16, 16), bool)
    mask[:8, :8] = True
    np.save(tmp_path / "m.npy", mask)
    cfg = compose("sample", ["stage2=run", f"mask={tmp_path / 'm.npy'}", "flux=1.0", "guidance_scale=2"])
    conditioned = model("model.cond_mask=true", "model.cond_flux=true")
    requested = requested_conditions(cfg, conditioned, (4, 4), 4)
    got = requested["conditions"]
    assert got["flux"] == 0.5 and np.asarray(got["roi_mask"]).shape == (4, 4) and got["roi_mask"][0][0] == 1.0
    # mask and flux: the guidance pulls toward the mask at the requested flux, held in both branches
    assert requested["guided"] == ["roi_mask"] and requested["flux_held"] == 1.0
    with pytest.raises(DataError, match=r"m.npy: shape \(16, 16\), expected .* H, W = \(32, 32\)"):
        requested_conditions(cfg, conditioned, (8, 8), 4)
    # a model trained on 2x2 sub-block planes gets the mask as those planes
    mask_only = compose("sample", ["stage2=run", f"mask={tmp_path / 'm.npy'}"])
    planes = np.asarray(requested_conditions(mask_only, model("model.cond_mask=true", "model.mask_subgrid=2"), (4, 4),
                                             4)["conditions"]["roi_mask"])
    np.testing.assert_array_equal(planes, C.mask_planes(mask, (4, 4), 2))
    assert planes.shape == (4, 4, 4) and (planes[:, :2, :2] == 1).all() and planes[:, 2:, 2:].sum() == 0
    with pytest.raises(ConfigError, match=r"'mask' = .*m.npy'.*trained without this condition \(model.cond_mask=false\)"):
        requested_conditions(cfg, model(), (4, 4), 4)
    flux_only = compose("sample", ["stage2=run", "flux=1.0"])
    with pytest.raises(ConfigError, match=r"'flux' = 1.0: .*\(model.cond_flux=false\)"):
        requested_conditions(flux_only, model("model.cond_mask=true"), (4, 4), 4)
    # a flux alone is guided itself; a mask alone is held at the training latents' median flux when it is recorded
    alone = requested_conditions(flux_only, conditioned, (4, 4), 4)
    assert alone == {"conditions": {"flux": 0.5}, "guided": None, "flux_held": None}
    guided_mask = compose("sample", ["stage2=run", f"mask={tmp_path / 'm.npy'}", "guidance_scale=2"])
    held = requested_conditions(guided_mask, conditioned, (4, 4), 4, flux_median=0.1)
    assert held["guided"] == ["roi_mask"] and held["flux_held"] == 0.1
    assert held["conditions"]["flux"] == pytest.approx(C.flux_value(0.1))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    free = requested_conditions(guided_mask, conditioned, (4, 4), 4)  # latents from before flux_median: as before
    assert free["guided"] is None and free["flux_held"] is None and "flux" not in free["conditions"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("stage2 'run' records no training flux") and "flux=" in warned[0]
    # unguided (scale 1) the brightness is not pinned; a model without a flux input guides its mask alone
    unguided = requested_conditions(mask_only, conditioned, (4, 4), 4, flux_median=0.1)
    assert unguided["guided"] is None and "flux" not in unguided["conditions"]
    assert requested_conditions(guided_mask, model("model.cond_mask=true"), (4, 4), 4, flux_median=0.1)["guided"] is None
