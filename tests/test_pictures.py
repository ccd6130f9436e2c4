"""Pictures a researcher reads: clouds framed on the person (hand-built clouds whose body is known,
and the synthetic data set), annotated rank-list tiles, junk marking, the worst-AP choice checked
against the loop reference of the metrics, and TensorBoard events read back (rank-list images,
the mesh's point size, the HParams metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from picture_checks import (
    FRAMED_H,
    FRAMED_W,
    decode_png,
    expected_tiles,
    frame_pixels,
    hparams_metrics,
    inner,
    tiles_of,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.mesh import plugin_data_pb2 as mesh_data
from test_metrics import reference

from ognet.config import load_config
from ognet.data import synth
from ognet.data.shards import ShardReader
from ognet.errors import ConfigError
from ognet.evaluate import METRICS, Evaluation, metric_tags
from ognet.metrics import PerQueryResult, rank_queries
from ognet.monitor import MESH_POINT_SIZE, Monitor
from ognet.pictures import (
    FRAME_COLOURS,
    LABEL_HEIGHT,
    MARGIN,
    TEXT_COLOUR,
    TILE_HEIGHT,
    TILE_WIDTH,
    Tile,
    body_count,
    label_band,
    point_spacing,
    render_cloud,
    render_rank_list,
)
from ognet.rank_lists import choose_queries, ranked_gallery, write_rank_lists

pytestmark = pytest.mark.usefixtures("one_thread")
GREEN, BLUE = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])


def photo_cloud(rng: np.random.Generator, rows: int = 64, cols: int = 32) -> tuple[np.ndarray, int]:
    """A `+bg` cloud built by hand: an upright elliptical person (one point per pixel, in a
    shuffled order like SMPL's, at depths in front of the plane) then the other pixels row-major
    on the plane z = -0.3. Returns (xyz, body point count)."""
    r, c = np.mgrid[0:rows, 0:cols]
    inside = ((r + 0.5 - rows / 2) / (0.4 * rows)) ** 2 + ((c + 0.5 - cols / 2) / (0.3 * cols)) ** 2 <= 1
    x, y = (c + 0.5 - cols / 2) / rows, (rows / 2 - r - 0.5) / rows  # one unit = the photo's height
    body = rng.permutation(np.flatnonzero(inside.ravel()))
    background = np.flatnonzero(~inside.ravel())  # row-major
    body_xyz = np.stack([x.ravel()[body], y.ravel()[body], rng.uniform(-0.1, 0.1, len(body))], axis=1)
    bg_xyz = np.stack([x.ravel()[background], y.ravel()[background], np.full(len(background), -0.3)], axis=1)
    return np.concatenate([body_xyz, bg_xyz]).astype(np.float32), len(body)


def two_colours(n: int, body: int) -> np.ndarray:
    """Body green, background blue: which pixels show the person is then plain to see."""
    return np.where((np.arange(n) < body)[:, None], GREEN, BLUE).astype(np.float32)


def assert_framed_on_the_person(picture: np.ndarray, fill: float) -> None:
    """The person (green) lies inside the picture with a margin on every side and fills at
    least `fill` of its height or width."""
    green = np.all(picture == (0, 255, 0), axis=2)
    rows, cols = np.flatnonzero(green.any(axis=1)), np.flatnonzero(green.any(axis=0))
    assert rows[0] > 0 and cols[0] > 0 and rows[-1] < TILE_HEIGHT - 1 and cols[-1] < TILE_WIDTH - 1, "body cut off"
    span = max((rows[-1] - rows[0] + 1) / TILE_HEIGHT, (cols[-1] - cols[0] + 1) / TILE_WIDTH)
    assert span >= fill, f"the body fills only {span:.0%} of the picture"


def enclosed_white(picture: np.ndarray) -> np.ndarray:
    """White pixels with drawn pixels left, right, above and below them: holes in the photo (white
    beyond the photo's edges is not enclosed)."""
    drawn = ~np.all(picture == 255, axis=2)

    def on_both_sides(axis: int) -> np.ndarray:
        before = np.maximum.accumulate(drawn, axis=axis)
        after = np.flip(np.maximum.accumulate(np.flip(drawn, axis=axis), axis=axis), axis=axis)
        return before & after

    return ~drawn & on_both_sides(0) & on_both_sides(1)


# ------------------------------------------------------------------------------------------------
# 1. Framing the person


def test_the_body_is_found_and_framed_on_a_hand_built_cloud():
    xyz, body = photo_cloud(np.random.default_rng(0))
    assert body_count(xyz) == body
    picture = render_cloud(xyz, two_colours(len(xyz), body))
    assert picture.shape == (TILE_HEIGHT, TILE_WIDTH, 3)
    assert_framed_on_the_person(picture, fill=1 / (1 + 2 * MARGIN) - 0.02)
    assert not enclosed_white(picture).any(), "holes in the picture"
    assert np.all(picture == (0, 0, 255), axis=2).any(), "the background around the person is drawn too"


def test_the_photo_is_upright_and_unmirrored_whichever_way_the_axes_point():
    """The background's first row is the top, its columns run left to right: a cloud stored with y
    down or x mirrored (both keep the file order) gives the same picture."""
    xyz, body = photo_cloud(np.random.default_rng(1))
    rgb = two_colours(len(xyz), body)
    rgb[: body // 3] = (1.0, 0.0, 0.0)  # an asymmetric mark: the first third of the body points
    picture = render_cloud(xyz, rgb)
    for flip in ((1, -1, 1), (-1, 1, 1), (-1, -1, 1)):
        assert np.array_equal(render_cloud(xyz * np.float32(flip), rgb), picture), flip


def test_a_cloud_without_background_is_all_person():
    xyz, body = photo_cloud(np.random.default_rng(2))
    person = xyz[:body]
    assert body_count(person) == body
    assert_framed_on_the_person(render_cloud(person, two_colours(body, body)), fill=0.9)
    flat = xyz * np.float32([1, 1, 0])  # the original's D2 option: z = 0, the rows still tell
    assert body_count(flat) == body


def test_synthetic_clouds_are_framed_on_their_body(tiny_shards):
    """ognet-synth puts the background plane behind the whole body, so the body is exactly the
    points above the lowest depth: a truth found without the file order."""
    for split in ("query", "gallery"):
        reader = ShardReader(tiny_shards / split)
        for i in range(len(reader)):
            sample = reader[i]
            body = int((sample.xyz[:, 2] > sample.xyz[:, 2].min()).sum())
            assert body_count(sample.xyz) == body, sample.path
            picture = render_cloud(sample.xyz, two_colours(len(sample.xyz), body))
            assert_framed_on_the_person(picture, fill=0.8)  # 512 points: wide squares, wide margins


def test_full_size_synthetic_clouds_have_no_holes():
    """8192 points (a 128 x 64 photo) drawn into 192 x 96: each point's square closes the gaps."""
    config = synth.PRESETS["tiny"]
    for spec in synth.plan_images(config)[::17]:
        xyz, rgb = synth.render_image(spec, config)
        body = body_count(xyz)
        assert body == int((xyz[:, 2] > xyz[:, 2].min()).sum()), spec.path
        holes = enclosed_white(render_cloud(xyz, two_colours(len(xyz), body)))
        assert not holes.any(), f"{spec.path}: holes at {np.argwhere(holes).tolist()}"


# ------------------------------------------------------------------------------------------------
# 2. Rank-list tiles: frames, labels, junk


def test_rank_list_tiles_are_framed_labelled_and_junk_is_faded():
    xyz, body = photo_cloud(np.random.default_rng(3))
    rgb = two_colours(len(xyz), body)
    kinds = ("query", "match", "other", "junk")
    tiles = [Tile(xyz, rgb, kind, (kind, "id 0002 cam 3", "")) for kind in kinds]
    tiles.append(Tile(xyz, rgb, "other", ()))
    picture = render_rank_list(tiles)
    assert picture.shape == (FRAMED_H + LABEL_HEIGHT, 5 * FRAMED_W, 3)
    plain = render_cloud(xyz, rgb)
    for (framed, band), tile in zip(tiles_of(picture), tiles):
        assert (frame_pixels(framed) == FRAME_COLOURS[tile.kind]).all(), tile.kind
        assert np.array_equal(inner(framed), plain // 2 + 128 if tile.kind == "junk" else plain), tile.kind
        text = np.all(band == TEXT_COLOUR, axis=2)
        assert text.sum() > 30 if tile.lines else not text.any(), tile.lines
        assert np.all((band == TEXT_COLOUR) | (band == 255), axis=2).all()  # crisp: no grey edges
    with pytest.raises(ValueError, match="at most 3 lines"):
        label_band(("a", "b", "c", "d"), 50)


def test_each_label_line_is_drawn_in_its_own_row():
    band = label_band(("", "id 0002 cam 3", ""), FRAMED_W)
    rows = np.flatnonzero(np.all(band == TEXT_COLOUR, axis=2).any(axis=1))
    assert rows[0] >= 13 and rows[-1] < 2 * 13 + 4  # the second line only


def test_junk_is_shown_where_the_ranking_would_have_put_it():
    scores = np.array([0.9, 0.8, 0.95, 0.7, 0.8, 0.1, 0.99, 0.5])
    junk = np.array([0, 0, 1, 0, 0, 1, 1, 0], dtype=bool)
    left_out = np.array([0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    items = ranked_gallery(scores, junk, left_out, top=3)
    # by score: 6 (junk) 2 (junk) 0 1 4 (tie with 1: lower index first) 3 7 (left out) 5 (junk)
    assert [(i.index, i.rank) for i in items] == [(6, None), (2, None), (0, 1), (1, 2), (4, 3)]
    assert items[0].score == 0.99
    capped = ranked_gallery(scores, junk, left_out, top=1)  # at most `top` junk items shown
    assert [(i.index, i.rank) for i in capped] == [(6, None), (0, 1)]
    every = ranked_gallery(scores, junk, left_out, top=10)  # fewer counted items than `top`
    assert [i.index for i in every] == [6, 2, 0, 1, 4, 3, 5]


# ------------------------------------------------------------------------------------------------
# 3. Which queries: first, or worst AP


def test_worst_ap_queries_are_the_lowest_ap_ones_with_a_match():
    readable = np.array([0, 1, 3, 4, 5, 6])  # query 2 unreadable
    result = PerQueryResult(
        ap=torch.tensor([0.5, 0.2, 0.0, 0.2, 0.9, 0.1], dtype=torch.float64),
        inp=torch.zeros(6, dtype=torch.float64),
        first_good=torch.tensor([0, 3, -1, 2, 0, 7]),  # query 3 has no match: not chosen
    )
    assert choose_queries(readable, result, 4, "worst_ap") == [6, 1, 4, 0]  # ties by query index
    assert choose_queries(readable, result, 3, "first") == [0, 1, 3]
    assert choose_queries(readable, result, 10, "worst_ap") == [6, 1, 4, 0, 5]


@pytest.fixture(scope="module")
def evaluation(tiny_shards) -> Evaluation:
    """Random unit features for the tiny set's query and gallery, ranked by the metrics' code;
    gallery item 5 unreadable (left out)."""
    query, gallery = ShardReader(tiny_shards / "query"), ShardReader(tiny_shards / "gallery")
    generator = torch.Generator().manual_seed(0)
    qf = torch.nn.functional.normalize(torch.randn(len(query), 16, generator=generator), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(len(gallery), 16, generator=generator), dim=1)
    left_out = np.zeros(len(gallery), dtype=bool)
    left_out[5] = True
    kept = np.flatnonzero(~left_out)
    qi, gi = query.index, gallery.index
    per_query = rank_queries(qf, qi.pids, qi.camids, gf[kept], gi.pids[kept], gi.camids[kept])
    no_query_left_out = np.zeros(len(query), dtype=bool)
    return Evaluation({}, query, gallery, qf, gf, no_query_left_out, left_out, per_query)


def test_worst_ap_rank_lists_in_tensorboard_and_png(evaluation, tmp_path):
    e = evaluation
    qi, gi, kept = e.query.index, e.gallery.index, ~e.gallery_left_out
    qf, gf = e.query_features.numpy(), e.gallery_features.numpy()
    ap, _, _ = reference(qf, qi.pids, qi.camids, gf[kept], gi.pids[kept], gi.camids[kept])
    worst = np.argsort(ap, kind="stable")[:3].tolist()  # every tiny query has a match
    assert len(set(ap[worst])) == 3 and ap[worst[-1]] < np.sort(ap)[3], "ties: the order would be ambiguous"

    monitor = Monitor(tmp_path / "tb", True)
    write_rank_lists(e, 3, "worst_ap", monitor, tmp_path, 7, "eval")
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == [f"eval/rank_list_worst_{k}" for k in range(3)]
    junk_seen = 0
    for k, q in enumerate(worst):
        [image] = events.Images(f"eval/rank_list_worst_{k}")
        picture = decode_png(image.encoded_image_string)
        assert image.step == 7
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"rank-list-eval-worst-{k}.png")), picture)
        scores = (e.gallery_features.double() @ e.query_features[q].double()).numpy()
        want = expected_tiles(scores, q, qi, gi, e.gallery_left_out)
        tiles = tiles_of(picture)
        assert len(tiles) == 1 + len(want)
        query = e.query[q]
        assert np.array_equal(inner(tiles[0][0]), render_cloud(query.xyz, query.rgb)), f"worst {k}: not query {q}"
        for (framed, band), (g, kind) in zip(tiles[1:], want):
            assert (frame_pixels(framed) == FRAME_COLOURS[kind]).all(), f"worst {k}, gallery {g}: not {kind}"
            cloud = render_cloud(e.gallery[g].xyz, e.gallery[g].rgb)
            assert np.array_equal(inner(framed), cloud // 2 + 128 if kind == "junk" else cloud)
            assert np.all(band == TEXT_COLOUR, axis=2).sum() > 30
        junk_seen += sum(kind == "junk" for _, kind in want)
    assert junk_seen > 0, "no junk among the pictured rankings: its marking went unchecked"


def test_first_rank_lists_keep_their_query_tags(evaluation, tmp_path):
    monitor = Monitor(tmp_path / "tb", True)
    write_rank_lists(evaluation, 2, "first", monitor, tmp_path, 0, "average")
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["average/rank_list_0", "average/rank_list_1"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["rank-list-average-0.png", "rank-list-average-1.png"]


# ------------------------------------------------------------------------------------------------
# 4. TensorBoard: the mesh's point size, the HParams metrics


def test_training_clouds_carry_a_readable_point_size(tmp_path):
    xyz, body = photo_cloud(np.random.default_rng(4))
    monitor = Monitor(tmp_path, True)
    monitor.point_cloud("train/cloud_0_id0007", xyz, two_colours(len(xyz), body), 1)
    monitor.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    assert {"train/cloud_0_id0007_VERTEX", "train/cloud_0_id0007_COLOR"} <= set(events.Tags()["tensors"])
    meta = mesh_data.MeshPluginData.FromString(
        events.SummaryMetadata("train/cloud_0_id0007_VERTEX").plugin_data.content
    )
    material = json.loads(meta.json_config)["material"]
    assert material["cls"] == "PointsMaterial"
    spacing = 1 / 64  # one pixel of the hand-built 64-row photo
    assert material["size"] == pytest.approx(MESH_POINT_SIZE * point_spacing(xyz))
    assert spacing <= material["size"] <= 3 * spacing  # wider than the viewer's 0.005 default


def test_hparams_list_every_evaluation_metric(tmp_path):
    monitor = Monitor(tmp_path, True)
    monitor.hparams(load_config().to_dict(), metric_tags("eval") + metric_tags("average"))
    monitor.close()
    assert hparams_metrics(tmp_path) == [f"{tag}/{m}" for tag in ("eval", "average") for m in METRICS]
    assert set(METRICS) == {"rank1", "rank5", "rank10", "mAP", "mINP"}


def test_rank_list_select_is_a_checked_config_key():
    assert load_config().eval.rank_list_select == "first"
    assert load_config(None, ["eval.rank_list_select=worst_ap"]).eval.rank_list_select == "worst_ap"
    with pytest.raises(ConfigError, match=r"eval.rank_list_select = 'worst' is not one of first, worst_ap"):
        load_config(None, ["eval.rank_list_select=worst"])
