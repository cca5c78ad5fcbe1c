"""deploy/, the Dockerfiles and the Grafana dashboard, checked statically: they parse, point at files that
exist, pin their images, and every dashboard query names only series the server exports. Fast: no server,
no Docker, no cluster (kubectl and promtool are used where installed)."""

import importlib.util
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import require_tool
from vllm_slim.metrics.gauges import GAUGES

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-slim.json"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
DOCKERFILES = {"Dockerfile": ["vllm", "serve"], "Dockerfile.cpu": ["vllm-slim", "serve"]}
DATASOURCE = "${datasource}"
# What prometheus_client exports for each metric type.
SAMPLE_SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
# Where the Dockerfiles put the repository; paths under it must exist in the repository.
IMAGE_SOURCE = "/opt/vllm-slim/"
PROMETHEUS_PACKAGE = "Debian's prometheus package, which .ci/run installs"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those nested in collapsed rows."""
    return [p for panel in dashboard["panels"] for p in (panel, *panel.get("panels", []))]


def exported_vllm_series() -> set[str]:
    """Every series name vLLM's Prometheus logger exports, from its source (vLLM is not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    metrics = re.findall(r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:\w+)"', source)
    assert len(metrics) > 30, "vLLM's loggers.py no longer declares its metrics the way this test reads them"
    return {name + suffix for kind, name in metrics for suffix in SAMPLE_SUFFIXES[kind]}


def metric_names(expr: str) -> list[str]:
    """The series a PromQL expression selects: identifiers left once label matchers, ranges, grouping
    clauses and function calls are taken out."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = [
        match.group() for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr)
        if not expr[match.end():].lstrip().startswith("(")  # a function
    ]
    return [name for name in names if name not in ("and", "or", "unless", "bool", "offset")]


def test_dashboard_is_current_grafana_schema_with_unique_panel_ids(dashboard):
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in all_panels(dashboard):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]


def test_every_panel_and_target_uses_the_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == DATASOURCE, (panel["title"], target["refId"])
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]


def test_model_name_variable_filters_every_query(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model_name = variables["model_name"]
    assert model_name["type"] == "query"
    assert re.fullmatch(r"label_values\(vllm:\w+(\{.*\})?, model_name\)", model_name["query"])
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            selections = len(metric_names(target["expr"]))
            assert target["expr"].count('model_name=~"$model_name"') == selections, (panel["title"], target["expr"])


def test_queries_name_only_series_the_server_exports(dashboard):
    exported = exported_vllm_series() | set(GAUGES)
    unknown = {
        f"{panel['title']}: {name}"
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
        for name in metric_names(target["expr"])
        if name not in exported
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            series = re.match(r"label_values\(([\w:]+)", variable["query"]).group(1)
            if series not in exported:
                unknown.add(f"variable {variable['name']}: {series}")
    assert not unknown, sorted(unknown)


def test_every_query_is_valid_promql(dashboard, tmp_path):
    """Each target as a recording rule, Grafana's variables filled in, through `promtool check rules`."""
    promtool = require_tool("promtool", PROMETHEUS_PACKAGE)
    rules = [
        {
            "record": f"panel_{panel['id']}_{target['refId']}",
            "expr": re.sub(r"\$\w+", ".*", target["expr"].replace("$__rate_interval", "1m")),
        }
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_the_panels_operators_need(dashboard):
    exprs = [target["expr"] for panel in all_panels(dashboard) for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in metric_names(expr)}
    assert set(GAUGES) <= used, sorted(set(GAUGES) - used)  # every gauge we export has a panel
    assert {
        "vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    } <= used
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        quantiles = [e for e in exprs if "histogram_quantile" in e and f"{histogram}_bucket" in e]
        assert len(quantiles) >= 3, histogram  # p50, p90, p99


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/vllm-slim.yml").read_text())
    (provider,) = providers["providers"]
    for compose_file in COMPOSE_FILES:
        grafana = yaml.safe_load((DEPLOY / compose_file).read_text())["services"]["grafana"]
        assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
        assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_prometheus_scrapes_the_compose_server():
    config_path = DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vllm:8000"]
    for compose_file in COMPOSE_FILES:
        services = yaml.safe_load((DEPLOY / compose_file).read_text())["services"]
        assert "8000:8000" in services["vllm"]["ports"]
        assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    promtool = require_tool("promtool", PROMETHEUS_PACKAGE)
    result = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_files_parse_and_point_at_existing_files(compose_file):
    services = yaml.safe_load((DEPLOY / compose_file).read_text())["services"]
    assert set(services) == {"vllm", "prometheus", "grafana"}
    build = services["vllm"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "--attention-backend" in services["vllm"]["command"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
        assert not service["image"].endswith(":latest") and ":" in service["image"], service["image"]
    gpus = services["vllm"].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert bool(gpus) == (compose_file == "docker-compose.yml")


@pytest.mark.parametrize("dockerfile, entrypoint", DOCKERFILES.items())
def test_dockerfiles_pin_their_base_and_serve(dockerfile, entrypoint):
    text = (ROOT / dockerfile).read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    image, _, tag = base.partition(":")
    assert tag and tag != "latest", base
    if image == "vllm/vllm-openai":
        # The image's vLLM must be one the plugin supports (pyproject's gpu extra).
        gpu_extra = next(
            line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("gpu =")
        )
        low, high = (tuple(map(int, v.split("."))) for v in re.findall(r"[<>]=?(\d+\.\d+)", gpu_extra))
        assert low <= tuple(map(int, tag.removeprefix("v").split(".")[:2])) < high, (base, gpu_extra)
    else:
        assert "'.[cpu]'" in text
    assert json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE).group(1)) == entrypoint
    copied = [path for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE) for path in source.split()]
    assert all((ROOT / path).exists() for path in copied), copied
    # what the package build reads beside the code: without it `pip install .` fails in the image
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"], *project["license-files"]} <= set(copied), copied


def test_paths_inside_the_image_exist_in_the_repository():
    """The default model the Dockerfiles, compose files and Deployment serve is the one shipped in the package."""
    files = [ROOT / name for name in DOCKERFILES] + [DEPLOY / name for name in COMPOSE_FILES]
    files.append(DEPLOY / "kubernetes" / "deployment.yaml")
    for path in files:
        for inside in re.findall(re.escape(IMAGE_SOURCE) + r"[\w./-]+", path.read_text()):
            assert (ROOT / inside.removeprefix(IMAGE_SOURCE) / "config.json").is_file(), (path.name, inside)


def kustomization_files(directory: Path) -> list[Path]:
    """The files a kustomization and the kustomizations it includes name, relative to their directories."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    files = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory / 'kustomization.yaml'}: {resource} does not exist"
        files += kustomization_files(path) if path.is_dir() else [path]
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator.get("files", []):
            path = (directory / file.split("=")[-1]).resolve()
            assert path.is_file(), f"{directory / 'kustomization.yaml'}: {file} does not exist"
            files.append(path)
    return files


def test_kustomization_lists_existing_files_in_the_shape_of_a_serving_stack():
    files = kustomization_files(DEPLOY / "kubernetes")
    assert DASHBOARD in files
    objects = {
        doc["kind"]: doc for path in files if path.suffix == ".yaml" for doc in yaml.safe_load_all(path.read_text())
    }
    assert set(objects) == {"Namespace", "Deployment", "Service", "ServiceMonitor"}
    deployment, service, monitor = objects["Deployment"], objects["Service"], objects["ServiceMonitor"]
    assert deployment["spec"]["replicas"] > 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports
    assert "--attention-backend=slim" in container["args"]


def test_kustomize_builds_the_stack_with_the_dashboard_configmap():
    # kustomize >= 4 (kubectl >= 1.21): Debian's kubernetes-client 1.20 rejects the `labels` field
    kubectl = require_tool("kubectl", "kubectl >= 1.21")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(result.stdout)}
    assert {kind for kind, _ in objects} == {"Namespace", "Deployment", "Service", "ServiceMonitor", "ConfigMap"}
    configmap = objects["ConfigMap", "vllm-slim-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["vllm-slim.json"]) == json.loads(DASHBOARD.read_text())
