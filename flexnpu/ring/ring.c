#include "ring.h"
uint32_t fx_layout_version(void) { return 1; }
