// answer_logprobs: log p(target | hidden) under softmax(hidden @ weight.T + bias), never materialising logits.
#pragma once
#include "common/checks.h"
