# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine command lines, rendered from one model entry of ``cortex_models``.

Private to the collection: the filter plugin and tests are its only users.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

# Where things are inside the llama.cpp container.
LLAMACPP_PORT = 8080
LLAMACPP_MODEL_DIR = "/models"
LLAMACPP_API_KEY_FILE = "/run/secrets/engine-api-key"


class EngineCommandError(ValueError):
    """A model entry cannot be rendered; the message names the model and field."""


def _flag_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def llamacpp_command(model, defaults=None):
    """The llama-server arguments (after the image's entrypoint) for one model.

    ``defaults`` holds the role's llama.cpp defaults; the model's own
    ``llamacpp`` section overrides them key by key.
    """
    name = model.get("name")
    if not name:
        raise EngineCommandError("a model entry has no name")
    options = dict(defaults or {})
    options.update(model.get("llamacpp") or {})
    model_file = model.get("model_file")
    if not model_file:
        raise EngineCommandError("model %s: no model file was resolved from its source" % name)

    args = [
        "--model",
        "%s/%s" % (LLAMACPP_MODEL_DIR, model_file),
        "--alias",
        name,
        # Inside the container's own network namespace; the host side is
        # published on loopback (or the internal address) only.
        "--host",
        "0.0.0.0",  # noqa: S104
        "--port",
        str(LLAMACPP_PORT),
        "--api-key-file",
        LLAMACPP_API_KEY_FILE,
        "--ctx-size",
        str(options.get("ctx_size", 4096)),
        "--parallel",
        str(options.get("parallel", 1)),
        "--n-gpu-layers",
        str(options.get("n_gpu_layers", 0)),
        # Engines sit behind the gateway; nobody browses to them.
        "--no-webui",
    ]
    if "flash_attn" in options:
        args += ["--flash-attn", _flag_value(options["flash_attn"])]
    if "threads" in options:
        args += ["--threads", str(options["threads"])]
    if options.get("embeddings"):
        args.append("--embeddings")
    if options.get("metrics", True):
        args.append("--metrics")
    extra = options.get("extra_args") or []
    if not isinstance(extra, list):
        raise EngineCommandError("model %s: llamacpp.extra_args must be a list of strings" % name)
    args += [str(a) for a in extra]
    return args
