"""Routing rules: matching, the default, and bad files stopping the service with the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.pacs.routing import InstanceAttributes, Router, load_rules
from app.settings import SettingsError
from tests.app.helpers import save_mean_classifier, save_pixel_model, serve, settings
from tests.app.pacs.helpers import instance, pacs_settings, stow, wait_for_jobs
from tests.models.test_dicom import to_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom")

RULES = """\
rules:
  - name: chest x-ray
    match:
      modality: [DX, CR]
      body_part_examined: chest
      rows: {min: 16, max: 64}
    models: [lungs]
  - match:
      sop_class_uid: 1.2.840.10008.5.1.4.1.1.7
      photometric_interpretation: MONOCHROME2
      columns: {max: 40}
    models: [lungs, other]
"""


def attributes(**values: object) -> InstanceAttributes:
    base: dict[str, object] = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7", "rows": 32, "columns": 32}
    base.update(values)
    return InstanceAttributes(has_pixels=True, **base)  # type: ignore[arg-type]


def test_the_first_matching_rule_names_the_models(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(RULES)
    router = load_rules(path, {"lungs", "other"})
    chest = router.route(attributes(modality="CR", body_part_examined="CHEST"))
    assert chest.models == ["lungs"] and chest.rule == "chest x-ray"
    # Too large for rule 1 (rows), small enough for rule 2 (columns).
    other = router.route(
        attributes(
            modality="CR", body_part_examined="CHEST", rows=100, photometric_interpretation="MONOCHROME2"
        )
    )
    assert other.models == ["lungs", "other"] and other.rule == "rule 2"
    missing = router.route(attributes(modality="CT", columns=100))
    assert missing.models == [] and "no routing rule of routes.yaml matches" in missing.reason
    absent = router.route(attributes(modality=None, body_part_examined="CHEST"))  # a key the instance lacks
    assert absent.models == []


def test_json_rules_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"rules": [{"match": {"modality": "MR"}, "models": "lungs"}]}))
    router = load_rules(path, {"lungs"})
    assert router.route(attributes(modality="mr")).models == ["lungs"]
    assert router.route(attributes(modality="CT")).models == []


def test_the_default_routes_images_only() -> None:
    router = Router()
    assert router.route(attributes()).models is None  # every ready model
    assert router.route(InstanceAttributes(sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34")).models == []


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("rules:\n  - match: {modality: CT}\n    models: [lungs]\n  - models: []\n", 4, "models"),
        ("rules:\n  - match:\n      modality: CT\n      size: 3\n    models: [lungs]\n", 4, "Extra inputs"),
        ("rules:\n  - match:\n      rows: {min: zero}\n    models: [lungs]\n", 3, "rules.0.match.rows.min"),
        ("rules:\n  - models: [lungs, ghost]\n", 2, "no model 'ghost'"),
        ("rules:\n  - models: [lungs]\n   bad: x\n", 3, "not valid YAML"),
        ("", 1, "empty"),
    ],
)
def test_a_bad_rules_file_names_the_file_and_the_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_rules(path, {"lungs"})
    message = str(caught.value)
    assert message.startswith(f"MEDSERVE_ROUTES: {path}, line {line}: "), message
    assert words in message


@pytest.mark.anyio
async def test_a_bad_rules_file_stops_the_service_at_start(pixel_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("rules:\n  - models: [nobody]\n")
    with pytest.raises(SettingsError, match=r"routes.yaml, line 2: .*no model 'nobody'"):
        async with serve(settings(pixel_dir, routes=path, **pacs_settings(tmp_path))):
            pass


@pytest.mark.anyio
async def test_routed_instances_go_to_their_models_and_the_rest_is_skipped(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    save_pixel_model(models / "lungs.pt")
    save_pixel_model(models / "bones.pt", weights=(1.0, -1.0))
    save_mean_classifier(models / "kind.pt")
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "rules:\n"
        "  - match: {modality: DX}\n    models: [lungs, bones]\n"
        "  - match: {modality: MR}\n    models: [kind]\n"
    )
    dx, ct, mr = instance(1, Modality="DX"), instance(2, Modality="CT"), instance(3, Modality="MR")
    async with serve(settings(models, routes=routes, **pacs_settings(tmp_path))) as (_, client):
        response = await stow(client, [to_bytes(dx), to_bytes(ct), to_bytes(mr)])
        jobs = await wait_for_jobs(client, {"done", "skipped", "failed"}, 4)
    assert response.status_code == 200
    outcome = sorted((job["sop_instance_uid"], job["model"], job["state"]) for job in jobs)
    assert outcome == sorted(
        [
            (dx.SOPInstanceUID, "lungs", "done"),
            (dx.SOPInstanceUID, "bones", "done"),
            (ct.SOPInstanceUID, None, "skipped"),
            # No DICOM result type for classification in this build (until the SR writer is registered).
            (mr.SOPInstanceUID, "kind", "failed" if not _sr_registered() else "done"),
        ]
    )
    skipped = next(job for job in jobs if job["state"] == "skipped")
    assert "no routing rule of routes.yaml matches" in skipped["reason"]


def _sr_registered() -> bool:
    from app.outputs import output_formats

    return "dicom-sr" in output_formats("classification")
