"""The PEFT adaptation in peft_eora._peft_compat: fails loudly when a PEFT release changes it."""

from __future__ import annotations

import json

import peft
import pytest
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.utils.peft_types import PeftType

import peft_eora
from peft_eora import CalibrationConfig, EoRAConfig, EoRAModel


def test_peft_type_is_a_real_enum_member():
    assert PeftType.EORA is PeftType("EORA")
    assert PeftType.EORA.value == "EORA"
    assert "EORA" in [t.value for t in PeftType]
    assert peft_eora.PEFT_TYPE is PeftType.EORA


def test_lookup_tables_know_eora():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.EORA] is EoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.EORA] is EoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.EORA] == "lora_"
    assert issubclass(EoRAModel, LoraModel)


def test_public_registration_api_still_refuses_unknown_types():
    """If PEFT opens register_peft_method to new names/shared prefixes, _peft_compat should use it."""
    with pytest.raises((ValueError, KeyError)):
        peft.utils.peft_types.register_peft_method(name="eora", config_cls=EoRAConfig, model_cls=EoRAModel, prefix="lora_")


def test_config_round_trip_is_json(tmp_path):
    cfg = EoRAConfig(
        r=16,
        original_model="some/model",
        calibration=CalibrationConfig(dataset="builtin:c4", num_samples=4, seq_len=32, seed=3),
        method="svd",
        damping=0.1,
    )
    assert cfg.lora_alpha == 16 and cfg.peft_type is PeftType.EORA
    cfg.save_pretrained(tmp_path)
    lora = json.loads((tmp_path / "adapter_config.json").read_text())
    raw = json.loads((tmp_path / "eora_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == 16 and "method" not in lora
    assert raw["calibration"]["seq_len"] == 32 and raw["method"] == "svd"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EoRAConfig)
    assert loaded.calibration == cfg.calibration and loaded.damping == 0.1 and loaded.original_model == "some/model"


@pytest.mark.parametrize(
    "kwargs, phrase",
    [({"method": "qr"}, "method must be one of"), ({"damping": -1.0}, "damping must be"), ({"use_dora": True}, "DoRA"),
     # initialisations that compute their own factors, and (but EVA) rewrite the base EoRA compensates
     *[({"init_lora_weights": init}, "rewrite the base weights") for init in ("pissa", "pissa_niter_4", "olora", "corda",
                                                                            "loftq", "eva", "orthogonal", "mica",
                                                                            "lora_ga")],
     ({"init_lora_weights": False}, "starts lora_B random"),
     # LoRA variants with another layer than x + s·B·A·x: the factors fit none of them (aLoRA's did nothing while its
     # statistics said they worked; QA-LoRA failed mid-walk with a shape error)
     *[({key: value}, "makes another layer") for key, value in (("alora_invocation_tokens", [3, 4]), ("use_qalora", True),
                                                              ("layer_replication", [[0, 2]]))]],
)
def test_config_rejects_bad_values(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        EoRAConfig(r=8, **kwargs)


def test_calibration_config_rejects_empty():
    with pytest.raises(ValueError, match="num_samples"):
        CalibrationConfig(num_samples=0)


def test_calibration_config_fields_checked_when_made(tmp_path):
    """A Path was kept as it was, so save_pretrained failed after the computation (not JSON); other types, sizes
    that are not integers and a lone source of weight 0 failed later with bare errors (a ZeroDivisionError)."""
    import numpy as np

    cfg = CalibrationConfig(dataset=tmp_path / "docs.txt", tokenizer=tmp_path / "tok", num_samples=np.int64(4),
                            mix=[{"dataset": tmp_path / "more.txt"}])
    assert (cfg.dataset, cfg.tokenizer, cfg.mix[0].dataset) == (str(tmp_path / "docs.txt"), str(tmp_path / "tok"),
                                                                 str(tmp_path / "more.txt"))
    assert type(cfg.num_samples) is int
    json.dumps(EoRAConfig(r=4, calibration=cfg).to_dict())
    with pytest.raises(TypeError, match="CalibrationConfig.dataset takes a path or Hub id .* not a list"):
        CalibrationConfig(dataset=["some text"])
    for bad in ({"seq_len": 64.5}, {"num_samples": True}, {"num_samples": "128"}):
        with pytest.raises(ValueError, match="must be an integer"):
            CalibrationConfig(**bad)
    with pytest.raises(ValueError, match="the only source needs a positive weight"):
        CalibrationConfig(weight=0)


def test_get_peft_model_and_reload_through_peft(tiny_llama, tmp_path):
    """get_peft_model, save_pretrained and PeftModel.from_pretrained all go through the registration."""
    model, _ = tiny_llama
    pm = get_peft_model(model, EoRAConfig(r=4, init_eora=False))
    assert pm.peft_type is PeftType.EORA
    assert isinstance(pm.base_model, EoRAModel)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(model.__class__(model.config), tmp_path)
    assert isinstance(reloaded.base_model, EoRAModel)
    assert isinstance(reloaded.peft_config["default"], EoRAConfig)


def test_import_does_not_need_gptqmodel():
    """gptqmodel is an optional extra: importing peft_eora (and PEFT) must not import it."""
    import subprocess
    import sys

    code = "import sys; import peft, peft_eora; assert 'gptqmodel' not in sys.modules, 'gptqmodel imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_subpackages_are_attributes_of_the_package():
    """The README's ``peft_eora.quantize.awq_original(...)``, ``peft_eora.prune.prune`` and
    ``peft_eora.eval.perplexity`` work after a bare ``import peft_eora`` (imported on first use)."""
    import subprocess
    import sys

    code = ("import sys, peft_eora\n"
            "assert 'peft_eora.quantize' not in sys.modules\n"
            "assert callable(peft_eora.quantize.awq_original) and callable(peft_eora.prune.prune)\n"
            "assert callable(peft_eora.eval.perplexity) and callable(peft_eora.eval.evaluate_task)\n"
            "assert 'eval' in dir(peft_eora)\n"
            "try:\n    peft_eora.nothing_here\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


_REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as C, PEFT_TYPE_TO_TUNER_MAPPING as T\n"
    "assert 'EORA' in C and T['EORA'].__name__ == 'EoRAModel', 'EoRA not registered'\n"
    "assert not [f for f in sys.meta_path if type(f).__name__ == '_AfterImport'], 'import hook left behind'\n"
)
#: Fresh interpreters, each importing in another order: PEFT knows EoRA as soon as both are imported.
IMPORT_ORDERS = {
    "peft_eora alone imports nothing heavy": "import peft_eora\n"
    "assert not {'torch', 'peft', 'transformers'} & set(sys.modules), sorted(sys.modules)\n",
    "peft_eora, then peft": "import peft_eora\nimport peft\n" + _REGISTERED,
    "peft, then peft_eora": "import peft\nimport peft_eora\n" + _REGISTERED,
    "a config module first": "from peft_eora.config import EoRAConfig\n" + _REGISTERED,
    "the tuner module first": "from peft_eora.model import EoRAModel\n" + _REGISTERED,
    "a module without PEFT, then peft": "import peft_eora.residual\nimport peft\n" + _REGISTERED,
    "a public name": "import peft_eora\nassert peft_eora.PEFT_TYPE.value == 'EORA'\n" + _REGISTERED,
}


@pytest.mark.slow
def test_registration_whatever_the_import_order():
    import subprocess
    import sys

    procs = {
        name: subprocess.Popen([sys.executable, "-c", "import sys\n" + code], stderr=subprocess.PIPE, text=True)
        for name, code in IMPORT_ORDERS.items()
    }
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed
