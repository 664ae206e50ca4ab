"""Models replaced without downtime: rescans, versions, draining, and the watcher (in-process, real files).

The models are ``PixelNet`` 1x1 convolutions with zero weights whose biases decide the answer: biases (1, 0) give
an all-background mask (0), biases (0, 1) an all-foreground one (255), so every answer's content tells which
version produced it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app import registry as registry_module
from app.batching import Batcher, BatcherClosedError
from app.errors import ModelNotFound, ModelRequired, VersionNotFound
from app.registry import ModelRegistry
from tests.app.helpers import (
    BUILD_GATE,
    PNG,
    assert_problem,
    decode_png,
    encode_image,
    open_gate,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
    wait_until,
)

pytestmark = pytest.mark.anyio

ADMIN_KEY = "adm-Zx8Cv6Bn4Mq2Wl0Pk9Ju"
HEADERS = {"X-API-Key": ADMIN_KEY}
IMAGE = encode_image(random_image(12, 10, seed=3))
BACKGROUND, FOREGROUND = (1.0, 0.0), (0.0, 1.0)


def save_constant(path: Path, biases: tuple[float, float], **kwargs: Any) -> str:
    """A PixelNet answering one class everywhere; returns its version."""
    return save_pixel_model(path, weights=(0.0, 0.0), biases=biases, **kwargs).version


def answer_value(content: bytes) -> int:
    """The one value of an all-constant PNG mask (0 or 255)."""
    mask = decode_png(content)
    values = np.unique(mask)
    assert len(values) == 1, values
    return int(values[0])


def reload_settings(model_dir: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {"api_keys": f"{ADMIN_KEY}:admin+infer", "model_poll_s": 0.0, "warmup": False}
    values.update(overrides)
    return settings(model_dir, **values)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    with open_gate("reload") as event:
        yield event


async def test_a_replaced_checkpoint_serves_its_new_version_and_the_previous_one_stays_selectable(
    tmp_path: Path,
) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (_, client):
        before = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        reload = await client.post("/admin/models/reload", headers=HEADERS)
        after = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        chosen = await client.post(f"/segment?version={first}", content=IMAGE, headers={**PNG, **HEADERS})
        summary = await client.post(
            f"/segment?format=json&version={first}", content=IMAGE, headers={**PNG, **HEADERS}
        )
        unknown = await client.post("/segment?version=0123abcd", content=IMAGE, headers={**PNG, **HEADERS})
        listing = (await client.get("/models", headers=HEADERS)).json()
        again = (await client.post("/admin/models/reload", headers=HEADERS)).json()
    assert first != second
    assert (before.headers["x-model-version"], answer_value(before.content)) == (first, 0)
    assert reload.status_code == 200
    assert reload.json() == {
        "added": [],
        "replaced": ["seg"],
        "removed": [],
        "failed": [],
        "unchanged": [],
        "versions": {"seg": second},
    }
    assert (after.headers["x-model-name"], after.headers["x-model-version"]) == ("seg", second)
    assert answer_value(after.content) == 255
    assert (chosen.headers["x-model-version"], answer_value(chosen.content)) == (first, 0)
    assert summary.json()["version"] == first and summary.json()["model"] == "seg"
    assert first in assert_problem(unknown, 404, "version-not-found")["detail"]
    (model,) = listing["models"]
    assert model["version"] == second and model["status"] == "ready" and model["error"] is None
    assert [(v["version"], v["state"]) for v in model["versions"]] == [
        (second, "serving"),
        (first, "previous"),
    ]
    assert again["unchanged"] == ["seg"] and again["replaced"] == []


async def test_classify_answers_name_the_version_and_take_version(tmp_path: Path) -> None:
    first = save_mean_classifier(tmp_path / "mean.pt").version
    async with serve(reload_settings(tmp_path)) as (_, client):
        second = save_mean_classifier(tmp_path / "mean.pt", scale=-4.0).version
        await client.post("/admin/models/reload", headers=HEADERS)
        bright = encode_image(np.full((8, 8), 250, dtype=np.uint8))
        new = await client.post("/classify", content=bright, headers={**PNG, **HEADERS})
        old = await client.post(f"/classify?version={first}", content=bright, headers={**PNG, **HEADERS})
    assert (new.json()["version"], new.json()["predictions"][0]["label"]) == (second, "dark")
    assert (old.json()["version"], old.json()["predictions"][0]["label"]) == (first, "bright")
    assert new.json()["model"] == old.json()["model"] == "mean"


async def test_versions_beyond_keep_versions_are_drained_and_released(tmp_path: Path) -> None:
    versions = [save_constant(tmp_path / "seg.pt", BACKGROUND)]
    async with serve(reload_settings(tmp_path, keep_versions=1)) as (app, client):
        registry: ModelRegistry = app.state.registry
        oldest = registry.models["seg"].current
        for biases in (FOREGROUND, (0.5, 0.0)):
            versions.append(save_constant(tmp_path / "seg.pt", biases))
            await client.post("/admin/models/reload", headers=HEADERS)
        await wait_until(lambda: not registry.draining, "the dropped version is drained")
        listing = (await client.get("/models", headers=HEADERS)).json()
        gone = await client.post(f"/segment?version={versions[0]}", content=IMAGE, headers={**PNG, **HEADERS})
    assert [v["version"] for v in listing["models"][0]["versions"]] == versions[:0:-1]
    assert listing["draining"] == []
    assert oldest is not None and not oldest.batcher.running and oldest.state == "stopped"
    assert_problem(gone, 404, "version-not-found")


async def test_with_keep_versions_0_only_the_new_version_stays(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path, keep_versions=0)) as (app, client):
        save_constant(tmp_path / "seg.pt", FOREGROUND)
        await client.post("/admin/models/reload", headers=HEADERS)
        await wait_until(lambda: not app.state.registry.draining, "the old version is drained")
        listing = (await client.get("/models", headers=HEADERS)).json()
        gone = await client.post(f"/segment?version={first}", content=IMAGE, headers={**PNG, **HEADERS})
    assert len(listing["models"][0]["versions"]) == 1
    assert_problem(gone, 404, "version-not-found")


async def test_a_request_admitted_before_the_replacement_finishes_on_its_version(
    tmp_path: Path, gate: threading.Event
) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND, gate="reload")
    config = reload_settings(tmp_path, keep_versions=0, max_batch_delay_ms=0)
    async with serve(config) as (app, client):
        registry: ModelRegistry = app.state.registry
        old = registry.models["seg"].current
        assert old is not None
        gate.clear()
        held = asyncio.create_task(client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS}))
        await wait_until(lambda: old.batcher.stats.batches == 1, "the old version runs the request")
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        report = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        new = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        draining = (await client.get("/models", headers=HEADERS)).json()["draining"]
        assert not held.done()
        gate.set()
        finished = await held
        await wait_until(lambda: not registry.draining, "the old version stops")
    assert report["replaced"] == ["seg"]
    assert (new.headers["x-model-version"], answer_value(new.content)) == (second, 255)
    assert [(d["name"], d["version"], d["state"]) for d in draining] == [("seg", first, "draining")]
    assert finished.status_code == 200
    assert (finished.headers["x-model-version"], answer_value(finished.content)) == (first, 0)
    assert not old.batcher.running


async def test_a_removed_file_stops_taking_requests_and_its_admitted_ones_finish(
    tmp_path: Path, gate: threading.Event
) -> None:
    version = save_constant(tmp_path / "gone.pt", BACKGROUND, gate="reload")
    save_constant(tmp_path / "stays.pt", FOREGROUND)
    config = reload_settings(tmp_path, max_batch_delay_ms=0)
    async with serve(config) as (app, client):
        registry: ModelRegistry = app.state.registry
        old = registry.models["gone"].current
        assert old is not None
        gate.clear()
        held = asyncio.create_task(
            client.post("/segment?model=gone", content=IMAGE, headers={**PNG, **HEADERS})
        )
        await wait_until(lambda: old.batcher.stats.batches == 1, "the request runs")
        (tmp_path / "gone.pt").unlink()
        report = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        refused = await client.post("/segment?model=gone", content=IMAGE, headers={**PNG, **HEADERS})
        only = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        assert old.batcher.running
        gate.set()
        finished = await held
        await wait_until(lambda: not registry.draining, "the removed model stops")
        names = [m["name"] for m in (await client.get("/models", headers=HEADERS)).json()["models"]]
    assert report["removed"] == ["gone"] and report["unchanged"] == ["stays"]
    assert_problem(refused, 404, "model-not-found")
    assert only.headers["x-model-name"] == "stays"  # the one segmentation model left needs no ?model=
    assert (finished.status_code, finished.headers["x-model-version"]) == (200, version)
    assert names == ["stays"]
    assert not old.batcher.running


async def test_a_broken_new_file_leaves_the_previous_version_serving_with_the_error_listed(
    tmp_path: Path,
) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (_, client):
        (tmp_path / "seg.pt").write_bytes(b"half a checkpoint")
        report = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        served = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        listing = (await client.get("/models", headers=HEADERS)).json()["models"][0]
        ready = await client.get("/health/ready")
        fixed = save_constant(tmp_path / "seg.pt", FOREGROUND)
        repaired = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        after = (await client.get("/models", headers=HEADERS)).json()["models"][0]
    assert report["failed"] == ["seg"] and report["versions"] == {"seg": first}
    assert (served.status_code, served.headers["x-model-version"]) == (200, first)
    assert listing["status"] == "ready" and listing["version"] == first
    assert "seg.pt" in listing["error"] and str(tmp_path) not in listing["error"]
    assert ready.status_code == 200
    assert repaired["replaced"] == ["seg"] and repaired["versions"] == {"seg": fixed}
    assert after["error"] is None


async def test_new_files_are_added_and_a_touched_file_is_not_reloaded(tmp_path: Path) -> None:
    save_constant(tmp_path / "a.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (app, client):
        version = save_constant(tmp_path / "b.pt", FOREGROUND)
        added = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        served = await client.post("/segment?model=b", content=IMAGE, headers={**PNG, **HEADERS})
        loaded = app.state.registry.models["a"].current
        os.utime(tmp_path / "a.pt", ns=(1, 1))  # a new modification time, the same bytes
        touched = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        same = app.state.registry.models["a"].current
    assert added["added"] == ["b"] and added["unchanged"] == ["a"]
    assert (served.headers["x-model-version"], answer_value(served.content)) == (version, 255)
    assert touched["unchanged"] == ["a", "b"] and same is loaded


async def test_restoring_a_kept_version_serves_it_again_without_a_duplicate(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    original = (tmp_path / "seg.pt").read_bytes()
    async with serve(reload_settings(tmp_path)) as (app, client):
        kept = app.state.registry.models["seg"].current
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        await client.post("/admin/models/reload", headers=HEADERS)
        (tmp_path / "rollback.tmp").write_bytes(original)
        (tmp_path / "rollback.tmp").replace(tmp_path / "seg.pt")
        report = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        handle = app.state.registry.models["seg"]
    assert report["replaced"] == ["seg"] and report["versions"] == {"seg": first}
    assert [v.version for v in handle.versions] == [first, second]
    assert handle.current is kept  # the kept runner serves again: no second copy was kept


async def test_the_serving_version_answers_while_the_new_file_loads(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (app, client):
        BUILD_GATE.clear()
        try:
            save_pixel_model(tmp_path / "seg.pt", architecture="test-slow-build")
            reload = asyncio.create_task(client.post("/admin/models/reload", headers=HEADERS))
            handle = app.state.registry.models["seg"]
            await wait_until(lambda: handle.reloading, "the new file is loading")
            during = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
            listing = (await client.get("/models", headers=HEADERS)).json()["models"][0]
            ready = await client.get("/health/ready")
        finally:
            BUILD_GATE.set()
        report = (await reload).json()
        after = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
    assert (during.status_code, during.headers["x-model-version"]) == (200, first)
    assert listing["reloading"] is True and listing["version"] == first
    assert ready.status_code == 200
    assert report["replaced"] == ["seg"]
    assert after.headers["x-model-version"] == report["versions"]["seg"] != first


async def test_the_watcher_picks_up_a_replaced_file_without_being_asked(tmp_path: Path) -> None:
    save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path, model_poll_s=0.05)) as (app, client):
        handle = app.state.registry.models["seg"]
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        await wait_until(
            lambda: handle.current is not None and handle.current.version == second, "the watcher reloads"
        )
        answer = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        added = save_constant(tmp_path / "late.pt", FOREGROUND)
        registry = app.state.registry
        await wait_until(
            lambda: "late" in registry.models and registry.models["late"].status == "ready", "added"
        )
        late = await client.post("/segment?model=late", content=IMAGE, headers={**PNG, **HEADERS})
    assert (answer.headers["x-model-version"], answer_value(answer.content)) == (second, 255)
    assert late.headers["x-model-version"] == added


async def test_without_polling_a_change_waits_for_the_admin_endpoint(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path, model_poll_s=0.0)) as (_, client):
        save_constant(tmp_path / "seg.pt", FOREGROUND)
        for _ in range(20):
            await asyncio.sleep(0.01)
        still = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
    assert still.headers["x-model-version"] == first


async def test_a_model_added_by_a_scan_answers_not_ready_while_it_loads(tmp_path: Path) -> None:
    save_constant(tmp_path / "a.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (app, client):
        BUILD_GATE.clear()
        try:
            save_pixel_model(tmp_path / "slow.pt", architecture="test-slow-build")
            reload = asyncio.create_task(client.post("/admin/models/reload", headers=HEADERS))
            await wait_until(lambda: "slow" in app.state.registry.models, "the new file is seen")
            early = await client.post("/segment?model=slow", content=IMAGE, headers={**PNG, **HEADERS})
        finally:
            BUILD_GATE.set()
        assert (await reload).json()["added"] == ["slow"]
        late = await client.post("/segment?model=slow", content=IMAGE, headers={**PNG, **HEADERS})
    assert_problem(early, 503, "not-ready")
    assert late.status_code == 200


async def test_the_interactive_endpoint_takes_version(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    hints = '{"points": [{"x": 2, "y": 2, "label": "foreground"}], "radius": 1}'
    async with serve(reload_settings(tmp_path)) as (_, client):
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        await client.post("/admin/models/reload", headers=HEADERS)
        answers = {
            version: await client.post(
                "/segment/interactive?model=seg" + (f"&version={version}" if version else ""),
                files={"file": ("scan.png", IMAGE, "image/png")},
                data={"hints": hints},
                headers=HEADERS,
            )
            for version in (None, first, "feedbeef")
        }
    assert answers[None].headers["x-model-version"] == second
    assert answers[first].headers["x-model-version"] == first
    assert_problem(answers["feedbeef"], 404, "version-not-found")


async def test_resolve_takes_any_task_and_a_version(tmp_path: Path) -> None:
    """The registry API of the other protocols: resolve(task or None, name, version) -> a loaded version."""
    seg = save_constant(tmp_path / "seg.pt", BACKGROUND)
    mean = save_mean_classifier(tmp_path / "mean.pt").version
    async with serve(reload_settings(tmp_path)) as (app, _):
        registry: ModelRegistry = app.state.registry
        by_name = registry.resolve(None, "mean")
        chosen = registry.resolve(None, "seg", seg)
        with pytest.raises(ModelRequired):
            registry.resolve(None, None)
        with pytest.raises(ModelNotFound):
            registry.resolve("classification", "seg")
        with pytest.raises(VersionNotFound):
            registry.resolve(None, "seg", "0000")
    assert (by_name.name, by_name.task, by_name.version) == ("mean", "classification", mean)
    assert (chosen.name, chosen.version, chosen.state) == ("seg", seg, "serving")
    assert chosen.batcher is registry.models["seg"].batcher


async def test_version_without_a_model_is_refused_by_the_interactive_endpoint(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    hints = '{"points": [{"x": 2, "y": 2, "label": "foreground"}], "radius": 1}'
    async with serve(reload_settings(tmp_path)) as (_, client):
        refused = await client.post(
            f"/segment/interactive?version={first}",
            files={"file": ("scan.png", IMAGE, "image/png")},
            data={"hints": hints},
            headers=HEADERS,
        )
    assert "needs ?model=" in assert_problem(refused, 422, "invalid-request")["detail"]


async def test_a_stopping_batcher_still_grants_more_places_to_a_request_it_admitted() -> None:
    """A multi-file request admitted by a version that is retired while its body is read keeps that version."""
    batcher: Batcher[int, int] = Batcher(
        "b", lambda xs: [x * 2 for x in xs], max_batch_size=4, max_delay_s=0.0, max_queue=8, timeout_s=30.0
    )
    batcher.start()
    first = batcher.reserve()
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosedError):
        batcher.reserve()  # a new request is refused
    second = first.another()  # the admitted one gets its other places
    results = await asyncio.gather(first.submit(1), second.submit(2))
    await stopping
    assert results == [2, 4] and not batcher.running
    with pytest.raises(RuntimeError):
        first.another()  # used already


async def test_metrics_list_each_loaded_version(tmp_path: Path) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (_, client):
        second = save_constant(tmp_path / "seg.pt", FOREGROUND)
        await client.post("/admin/models/reload", headers=HEADERS)
        text = (await client.get("/metrics", headers=HEADERS)).text
    lines = [line for line in text.splitlines() if line.startswith("medserve_model_version_info{")]
    assert sorted(lines) == sorted(
        [
            f'medserve_model_version_info{{model="seg",state="serving",version="{second}"}} 1.0',
            f'medserve_model_version_info{{model="seg",state="previous",version="{first}"}} 1.0',
        ]
    )


async def test_an_unreadable_file_is_reported_and_the_previous_version_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save_constant(tmp_path / "seg.pt", BACKGROUND)
    async with serve(reload_settings(tmp_path)) as (_, client):
        save_constant(tmp_path / "seg.pt", FOREGROUND)

        def unreadable(path: Path) -> str:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(registry_module, "file_digest", unreadable)  # root reads any file: simulate it
        report = (await client.post("/admin/models/reload", headers=HEADERS)).json()
        served = await client.post("/segment", content=IMAGE, headers={**PNG, **HEADERS})
        listing = (await client.get("/models", headers=HEADERS)).json()["models"][0]
        monkeypatch.undo()
        retried = (await client.post("/admin/models/reload", headers=HEADERS)).json()
    assert report["failed"] == ["seg"] and report["versions"] == {"seg": first}
    assert served.headers["x-model-version"] == first
    assert listing["error"] == "seg.pt: cannot be read (PermissionError)" and listing["status"] == "ready"
    assert str(tmp_path) not in listing["error"]
    assert retried["replaced"] == ["seg"] and retried["versions"]["seg"] != first
