#define _DEFAULT_SOURCE
#include "mem.h"

#include <fcntl.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

void* aligned64(size_t bytes) {
  void* p = NULL;
  return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

size_t release_file_pages(const void* p, size_t bytes) {
  long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return 0;
  uintptr_t lo = ((uintptr_t)p + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
  uintptr_t hi = ((uintptr_t)p + bytes) / (uintptr_t)page * (uintptr_t)page;
  if (hi <= lo) return 0;
  int fd = open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return 0;
  /* one 64-bit entry per page: bit 63 present, 62 swapped, 61 a file page or shared anonymous */
  uint64_t entries[512];
  size_t pages = (hi - lo) / (size_t)page;
  int lossless = 1;
  for (size_t i = 0; i < pages && lossless; i += 512) {
    size_t n = pages - i < 512 ? pages - i : 512;
    off_t at = (off_t)((lo / (uintptr_t)page + i) * sizeof(uint64_t));
    if (pread(fd, entries, n * sizeof(uint64_t), at) != (ssize_t)(n * sizeof(uint64_t))) lossless = 0;
    for (size_t j = 0; j < n && lossless; j++) {
      uint64_t e = entries[j];
      if ((e >> 62) & 1 || ((e >> 63) & 1 && !((e >> 61) & 1))) lossless = 0;
    }
  }
  close(fd);
  if (!lossless) return 0;
  return madvise((void*)lo, hi - lo, MADV_DONTNEED) == 0 ? hi - lo : 0;
}
