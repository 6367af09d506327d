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

# Each test file is one unit of work for xdist (`-n 2 --dist loadfile --no-loadscope-reorder` in make test and
# make test-integration), handed out in this order, longest first, so that the two workers finish together
# (seconds of work measured on 2 cores; order, not correctness). Files that share a session fixture form one unit:
# each worker builds its own session fixtures, and the integration micro project (the team server, pretrain_mae,
# finetune@mae-0) serves the three team files.
TEAM_MICRO = (  # the files the integration micro project serves: one unit of work
    "tests/integration/test_team_mlflow.py",
    "tests/integration/test_dvc_remote.py",
    "tests/integration/test_two_nodes.py",
)
LONGEST_FIRST = (
    "tests/pipelines/test_gpu_profile.py",  # integration 167 s
    "tests/pipelines/test_report.py",  # integration 161 s
    "tests/pipelines/test_adaptive_schedule.py",  # integration 143 s
    "tests/integration/test_parallel_flow.py",  # 111 s
    "tests/integration/test_deployment.py",  # 107 s
    "tests/pipelines/test_finetune.py",  # default 101 s
    "tests/components/test_ibot.py",  # 95 s
    "tests/pipelines/test_pretrain_ibot.py",  # 86 s
    "tests/pipelines/test_reliability.py",  # 82 s
    *TEAM_MICRO,  # 81 s together
    "tests/pipelines/test_detect.py",  # 78 s
    "tests/pipelines/test_prepare.py",  # 69 s
    "tests/pipelines/test_flow.py",  # 59 s
    "tests/pipelines/test_pretrain_mae.py",  # 37 s
    "tests/pipelines/test_cka.py",  # 29 s
    "tests/pipelines/test_params.py",  # 22 s
)
SHARED = dict.fromkeys(TEAM_MICRO, "team-micro")


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the files that share a session fixture as one unit of work."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return SHARED.get(path, path)

    return FileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
