import os

for key, value in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)

# The longest-running files first, so that `-n 2 --dist loadfile` (make test, make test-integration) does not
# leave one worker running a long file alone at the end. Measured on 2 cores; order, not correctness.
LONGEST_FIRST = (
    "tests/pipelines/test_report.py",
    "tests/pipelines/test_gpu_profile.py",
    "tests/pipelines/test_adaptive_schedule.py",
    "tests/pipelines/test_finetune.py",
    "tests/pipelines/test_detect.py",
    "tests/pipelines/test_reliability.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
