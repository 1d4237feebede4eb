#ifndef FLEXNPU_RING_H
#define FLEXNPU_RING_H
#include <stdint.h>
#include <stddef.h>

/* CDEF-BEGIN */
uint32_t fx_layout_version(void);
/* CDEF-END */

#endif
