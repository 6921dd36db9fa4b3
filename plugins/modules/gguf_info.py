#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: gguf_info
short_description: Read the metadata of a GGUF model file
version_added: 0.1.0
description:
  - Reads a GGUF file's metadata with the C(gguf) package, giving architecture,
    parameter count, quantization, context length, layers, attention heads and
    KV heads, and embedding size, which the resource planner needs.
  - For a mixture of experts (gpt-oss, Mixtral, Qwen3-MoE), the experts per
    layer and per token and the bytes of each layer's experts; for
    sliding-window attention (gpt-oss, Gemma 2 and 3, Cohere 2), the window and
    the layers that use it, from the file's own pattern or else the pattern
    llama.cpp gives the architecture; the bytes and weight types of each tensor
    group (attention, experts, shared experts, dense feed-forward, embedding,
    output).
  - A split model (C(name-00001-of-00003.gguf)) is read as one model; every
    part must be present next to the one named.
  - Fails, naming the file, when it is missing or not GGUF.
author:
  - cortex.serving maintainers (!UNKNOWN)
requirements:
  - gguf (the Python package of llama.cpp) where the module runs; 0.18 or later for MXFP4 files such as gpt-oss
options:
  path:
    description: Path of the GGUF file, or of any part of a split model.
    type: path
    required: true
attributes:
  check_mode:
    support: full
    description: Only reads; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
"""

EXAMPLES = r"""
- name: Read a model's shape on the controller, where the file was fetched
  cortex.serving.gguf_info:
    path: /srv/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
  delegate_to: localhost
  register: smollm2

- name: Show its grouped-query attention
  ansible.builtin.debug:
    msg: "{{ smollm2.model.head_count }} heads share {{ smollm2.model.head_count_kv }} KV heads"
"""

RETURN = r"""
model:
  description: The model's metadata.
  returned: success
  type: dict
  contains:
    architecture:
      description: C(general.architecture).
      type: str
      sample: llama
    name:
      description: C(general.name).
      type: str
      sample: Smollm2 135M 8k Lc100K Mix1 Ep2
    parameter_count:
      description: Elements of all tensors, across all parts.
      type: int
      sample: 134515008
    quantization:
      description: llama.cpp's name of C(general.file_type).
      type: str
      sample: Q4_1
    file_type:
      description: C(general.file_type) as a number.
      type: int
      sample: 3
    context_length:
      description: Context length the model was trained for.
      type: int
      sample: 8192
    block_count:
      description: Transformer layers.
      type: int
      sample: 30
    embedding_length:
      description: Embedding size.
      type: int
      sample: 576
    feed_forward_length:
      description: Feed-forward size.
      type: int
      sample: 1536
    head_count:
      description: Attention heads.
      type: int
      sample: 9
    head_count_kv:
      description: Key/value heads (grouped-query attention); equal to I(head_count) without GQA.
      type: int
      sample: 3
    key_length:
      description: Size of one key head.
      type: int
      sample: 64
    value_length:
      description: Size of one value head.
      type: int
      sample: 64
    vocab_size:
      description: Vocabulary size, when the file records it.
      type: int
      sample: 49152
    split_count:
      description: Number of files of the model.
      type: int
      sample: 1
    files:
      description: The model's files, in order.
      type: list
      elements: str
    size_bytes:
      description: Size of all files together.
      type: int
      sample: 98362432
    tensor_bytes:
      description: Size of all tensor data together.
      type: int
      sample: 96576768
    token_embd_bytes:
      description: Size of the input embedding matrix, which llama.cpp keeps in host memory.
      type: int
      sample: 15925248
    tied_output:
      description: Whether the model has no output matrix of its own and reuses the embedding.
      type: bool
      sample: true
    output_bytes:
      description: Size of the output matrix (the embedding's size when it is tied).
      type: int
      sample: 15925248
    path:
      description: The path asked about.
      type: str
    head_count_kv_per_layer:
      description: Key/value heads of each layer, when the file gives them per layer; else null.
      type: list
      elements: int
    key_length_swa:
      description: Size of one key head on the sliding-window layers (I(key_length) unless the file says otherwise).
      type: int
      sample: 64
    value_length_swa:
      description: Size of one value head on the sliding-window layers.
      type: int
      sample: 64
    expert_count:
      description: Experts per layer of a mixture of experts; 0 for a dense model.
      type: int
      sample: 128
    expert_used_count:
      description: Experts each token runs through.
      type: int
      sample: 4
    expert_feed_forward_length:
      description: Feed-forward size of one expert.
      type: int
      sample: 2880
    expert_shared_count:
      description: Shared experts every token runs through.
      type: int
      sample: 0
    sliding_window:
      description: Tokens the sliding-window layers attend to; 0 when no layer slides.
      type: int
      sample: 128
    sliding_window_pattern:
      description: The file's own C(attention.sliding_window_pattern) (a period, or C(per layer)); null when the architecture's is used.
      type: raw
    swa_layers:
      description: The layers llama.cpp runs with the sliding window.
      type: list
      elements: int
      sample: [0, 2, 4]
    attention_sinks:
      description: Whether the layers have attention sinks (gpt-oss).
      type: bool
    tensor_groups:
      description:
        - Per group (C(attention), C(experts), C(shared_experts), C(feed_forward), C(embedding), C(output), C(other)),
          its C(bytes), number of C(tensors) and C(types) (tensor count per weight type).
      type: dict
      sample: {experts: {bytes: 61073326080, tensors: 216, types: {MXFP4: 108, F32: 108}}}
    layer_bytes:
      description: Bytes of each layer's tensors, in layer order.
      type: list
      elements: int
    layer_expert_bytes:
      description: Bytes of each layer's expert tensors (what C(--n-cpu-moe) keeps in host memory).
      type: list
      elements: int
    expert_tensor_max_bytes:
      description: Bytes of the largest expert tensor.
      type: int
      sample: 587530080
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import GGUFInfoError, read_gguf_info

try:
    import gguf

    GGUF_IMPORT_ERROR = None
except ImportError:
    gguf = None
    GGUF_IMPORT_ERROR = traceback.format_exc()


def main():
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True)),
        supports_check_mode=True,
    )
    if gguf is None:
        module.fail_json(msg=missing_required_lib("gguf"), exception=GGUF_IMPORT_ERROR)
    try:
        model = read_gguf_info(module.params["path"], gguf)
    except GGUFInfoError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001 - the gguf reader raises plain errors on corrupt files
        module.fail_json(
            msg="cannot read %s as GGUF: %s" % (module.params["path"], exc), exception=traceback.format_exc()
        )
    module.exit_json(changed=False, model=model)


if __name__ == "__main__":
    main()
