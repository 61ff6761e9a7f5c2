# Copyright 2026 The capsule_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Pieces every decoder family shares: the causal mask of a chunk, the final norm and head."""

import torch


def causal_mask(start_pos: int, end_pos: int, first_key: int,
                device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """
    Attention mask and is-causal flag for queries at ``[start_pos, end_pos)``.

    Keys are positions ``[first_key, end_pos)``. One query needs no mask; queries starting at
    the first key are plainly causal; otherwise query i (at start_pos + i) sees keys
    j <= start_pos + i: a boolean mask [S, end - first_key].
    """
    if end_pos - start_pos == 1:
        return None, False
    if start_pos == first_key:
        return None, True
    key_positions = torch.arange(first_key, end_pos, device=device)
    query_positions = torch.arange(start_pos, end_pos, device=device)
    return key_positions[None, :] <= query_positions[:, None], False


def final_logits(model, x: torch.Tensor, all_logits: bool, return_hidden: bool):
    """
    Apply the final norm and head to a family's last layer output x [S, D].

    Logits [S, V] with ``all_logits`` else [V]; with ``return_hidden`` the pair
    (logits, normed hidden states [S, D]). Without it only the last row is normed.
    """
    if not (all_logits or return_hidden):
        x = x[-1:]
    normed = model._rms_norm(x, model.final_norm)  # [S or 1, D]
    logits = model.logits(normed if all_logits else normed[-1:])  # [S or 1, V]
    logits = logits if all_logits else logits[0]
    return (logits, normed) if return_hidden else logits
