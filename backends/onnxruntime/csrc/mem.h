/* Memory the kernels no longer need. */
#ifndef MODELFOLD_MEM_H
#define MODELFOLD_MEM_H
#include <stddef.h>

/* Drops this process's pages of [p, p + bytes) (whole pages inside it) where every page present is
   a page of a file or of shared memory: dropping them loses nothing (a later read brings the same
   bytes back from the file) and takes them out of the resident set. Private anonymous or modified
   pages (a heap buffer, a copy-on-write page) are left alone: then nothing is dropped. Used on the
   weights a kernel repacked, which ONNX Runtime memory-maps from the external data file. Returns
   the bytes dropped (0 where it did nothing, or where /proc/self/pagemap cannot be read). */
size_t release_file_pages(const void* p, size_t bytes);

/* bytes (at least 64) aligned to 64, for free(); NULL when out of memory */
void* aligned64(size_t bytes);
#endif
