"""`mmbridge env`: what a failure report needs to name its machine."""

import json

import torch

from mmbridge.cli import main


def test_env_names_the_processor_torch_and_its_kernels(capsys, monkeypatch):
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # a variable that changes rounding is shown
    main(["env", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["torch"] == torch.__version__ and got["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert got["cores"] >= 1 and got["cpu"] and got["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert got["blas"] in torch.__config__.show()
    main(["env"])
    assert f"torch: {torch.__version__}" in capsys.readouterr().out
