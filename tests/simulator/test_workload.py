"""``--trace``: InferenceService YAMLs as users write them; anything else is refused by name."""

from pathlib import Path

import pytest
import yaml

from gpushare.core import errors, names
from gpushare.simulator import kserve, workload

SHARED = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def _isvc(name: str, memory: str | None = "20Gi", **predictor: object) -> dict[str, object]:
    annotations = {names.ANNOTATION_GPU_MEMORY: memory} if memory else {}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"predictor": predictor or {"containers": [{"name": "kserve-container",
                                                             "image": "vllm/vllm-openai"}]}},
    }


def test_a_folder_of_multi_document_files_is_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all([_isvc("c"), _isvc("d")]))
    (tmp_path / "a.yml").write_text(yaml.safe_dump(_isvc("a", "1.5Gi")))
    (tmp_path / "notes.txt").write_text("not a trace")
    services = workload.load(tmp_path)
    assert [s.name for s in services] == ["a", "c", "d"]
    assert services[0].requested_bytes == 1536 * 2**20
    assert services[0].namespace == "default"
    assert services[1].source == "b.yaml#1"


def test_a_kubectl_list_is_unpacked(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"kind": "List", "items": [_isvc("x")]}))
    assert [s.name for s in workload.load(tmp_path / "list.yaml")] == ["x"]


def test_the_seed_articles_services_load_once_annotated(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    for fixture in sorted(SHARED.glob("*.yaml")):
        document = yaml.safe_load(fixture.read_text())
        document["metadata"]["annotations"] = {names.ANNOTATION_GPU_MEMORY: "20Gi"}
        (tmp_path / fixture.name).write_text(yaml.safe_dump(document))
        service = workload.load(tmp_path / fixture.name)[0]
        assert service.key == "kserve-test/bloom"
        assert service.label == "/mnt/models"


def test_an_unparseable_annotation_is_left_for_admission_to_judge(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(_isvc("x", "lots")))
    service = workload.load(tmp_path / "t.yaml")[0]
    assert service.annotation == "lots"
    assert service.requested_bytes is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a: [b", "is not YAML: "),
        (yaml.safe_dump({"kind": "Pod", "apiVersion": "v1"}), "kind 'Pod' (v1) is not an"),
        (yaml.safe_dump(_isvc("x", None)), "has no gpushare.io/gpu-memory annotation"),
        (yaml.safe_dump(_isvc("Bad_Name")), "must be lower-case"),
        (yaml.safe_dump_all([_isvc("x"), _isvc("x")]), "is already defined at t.yaml#1"),
        (yaml.safe_dump(_isvc("x", predictor={})) .replace("predictor: {}", "predictor: 3"),
         "has no spec.predictor"),
        ("- 1\n- 2\n", "expected an InferenceService mapping"),
        ("", "no InferenceService found"),
    ],
    ids=["yaml", "kind", "annotation", "name", "duplicate", "predictor", "list", "empty"],
)
def test_bad_traces_are_refused_with_where_and_why(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(errors.BadRequest) as refused:
        workload.load(tmp_path / "t.yaml")
    assert says in str(refused.value)


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest, match="no such file or folder"):
        workload.load(tmp_path / "nope.yaml")


def test_kserve_copies_annotations_and_labels_onto_the_predictor_pod() -> None:
    service = workload.parse(_isvc("chat", "12Gi"), source="t")
    pod = kserve.predictor_pod(service)
    assert pod["metadata"]["annotations"] == {names.ANNOTATION_GPU_MEMORY: "12Gi"}
    assert pod["metadata"]["labels"][kserve.ISVC_LABEL] == "chat"
    assert pod["metadata"]["name"].startswith("chat-predictor-")
    assert pod["spec"]["containers"][0]["image"] == "vllm/vllm-openai"


def test_the_model_form_runs_the_vllm_runtime_with_the_models_arguments() -> None:
    model = {
        "modelFormat": {"name": "vLLM"},
        "runtime": "kserve-vllmserver",
        "storageUri": "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "args": ["--max-model-len=4096"],
        "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
    }
    service = workload.parse(_isvc("small", "3Gi", model=model), source="t")
    pod = kserve.predictor_pod(service)
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["args"][-1] == "--max-model-len=4096"
    assert "--served-model-name=small" in container["args"]
    assert container["resources"] == model["resources"]
    assert pod["spec"]["initContainers"][0]["args"][0] == model["storageUri"]
    assert service.label == "hf://Qwen/Qwen2.5-0.5B-Instruct"
