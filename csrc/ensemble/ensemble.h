// ensemble: REPLUG marginal, LSR distillation loss and token mixture over k retrieved chunks.
#pragma once
#include "common/checks.h"
