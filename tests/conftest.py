import os

for key, value in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)

# Under xdist each worker gets its share of the cores, for its own torch and for the stages it starts (they
# inherit OMP_NUM_THREADS): two workers with two OpenMP threads each on two cores spin against each other, which
# made the digits test 401 s instead of 128 s. A stage's explicit runtime.threads still wins.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

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
