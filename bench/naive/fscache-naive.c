/*
 * fscache-naive: the simplest cachefiles on-demand server, the floor dedupd is measured
 * against in the VM suite (kernel-tests/vm/t62-fio-naive.sh, issue 17).
 *
 *   fscache-naive CACHE_DIR TAG SRC_DIR
 *
 * Binds /dev/cachefiles in on-demand mode to CACHE_DIR and serves every object from a
 * plain file: the cookie key the kernel sends with an OPEN (an EROFS fsid, or the tag of
 * an extra device) names SRC_DIR/<cookie key>, usually a symlink to an exported image or
 * blob. One thread, one message per read(2); a READ is served by pread from the source
 * and pwrite to the object's anon fd, then READ_COMPLETE. No verification, no
 * decompression, no read-ahead: whatever dedupd costs above this is its own.
 *
 * Written from the ABI of include/uapi/linux/cachefiles.h (Linux 6.12), as mirrored in
 * src/frontend/cachefiles/abi.rs; the message checks follow msg.rs. Prints one line on
 * stderr once bound ("fscache-naive: bound ..."), which the test waits for, and exits 0
 * on SIGTERM or SIGINT (closing the device unbinds the cache once nothing is mounted).
 */
#define _GNU_SOURCE /* ppoll */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- The ABI (include/uapi/linux/cachefiles.h) ---- */
#define MSG_MAX_SIZE 1024 /* one read(2) returns one whole message of at most this */
#define OP_OPEN 0
#define OP_CLOSE 1
#define OP_READ 2
/* _IOW(0x98, 1, int); the argument is the msg_id itself, passed by value. */
#define IOC_READ_COMPLETE 0x40049801UL

struct msg_hdr { /* struct cachefiles_msg, followed by data[] */
  uint32_t msg_id;
  uint32_t opcode;
  uint32_t len; /* of the whole message, header included */
  uint32_t object_id;
};
struct open_hdr { /* struct cachefiles_open, followed by volume key, then cookie key */
  uint32_t volume_key_size; /* includes the volume key's NUL */
  uint32_t cookie_key_size; /* binary, no NUL */
  uint32_t fd;              /* the anon fd the kernel installed in our table */
  uint32_t flags;
};
struct read_req { /* struct cachefiles_read */
  uint64_t off;
  uint64_t len;
};

/* Compile-time checks (C99 has no _Static_assert): a negative array size fails. */
typedef char check_msg_hdr[sizeof(struct msg_hdr) == 16 ? 1 : -1];
typedef char check_open_hdr[sizeof(struct open_hdr) == 16 ? 1 : -1];
typedef char check_read_req[sizeof(struct read_req) == 16 ? 1 : -1];
typedef char check_ioctl[_IOW(0x98, 1, int) == IOC_READ_COMPLETE ? 1 : -1];

/* ---- Limits of this server ---- */
#define PAGE 4096u
/* Fills go through one buffer in pieces of this size (READs are 16 KiB to 1 MiB). */
#define BUF_BYTES (1u << 20)
/* A READ longer than this is refused, as dedupd refuses one (serve::MAX_FILL_BYTES). */
#define MAX_READ_LEN (64ull << 20)
/* Open objects at once: two per mount here (the image and its blob). */
#define MAX_OBJECTS 1024
/* How long to retry an EBUSY open of the device (a previous daemon's cache unbinding). */
#define BUSY_RETRY_MS 15000

#define LOG(...) (fprintf(stderr, "fscache-naive: " __VA_ARGS__), fputc('\n', stderr))

struct object {
  uint32_t id;
  int src_fd;  /* SRC_DIR/<cookie key>, read-only */
  int anon_fd; /* the object's cache file, as the kernel handed it over */
};

static struct object objects[MAX_OBJECTS];
static int n_objects;
static int dev_fd = -1;
static int src_dir_fd = -1;
static unsigned char *buf; /* page-aligned: the anon fd writes are O_DIRECT */
static volatile sig_atomic_t stop;
static uint64_t n_opens, n_reads, n_bytes, n_errors;

static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

static struct object *find(uint32_t id) {
  for (int i = 0; i < n_objects; i++)
    if (objects[i].id == id) return &objects[i];
  return NULL;
}

static void drop(uint32_t id) {
  struct object *o = find(id);
  if (!o) return;
  close(o->src_fd);
  close(o->anon_fd);
  *o = objects[--n_objects]; /* order does not matter */
}

/* A text command to the device; the kernel parses one per write(2). */
static int command(const char *text) {
  size_t len = strlen(text);
  ssize_t n = write(dev_fd, text, len);
  if (n != (ssize_t)len) {
    LOG("writing \"%s\": %s", text, n < 0 ? strerror(errno) : "short write");
    return -1;
  }
  return 0;
}

/* copen <msg_id>,<size>: the object's size, or a negative errno that fails the OPEN. */
static void copen(uint32_t msg_id, int64_t size_or_neg_errno) {
  char text[64];
  snprintf(text, sizeof text, "copen %" PRIu32 ",%" PRId64, msg_id, size_or_neg_errno);
  if (command(text) < 0) n_errors++;
}

/* A cookie key usable as one file name below SRC_DIR: no NUL, no '/', not . or .. */
static int valid_name(const unsigned char *key, uint32_t size) {
  if (size == 0 || size > NAME_MAX) return 0;
  if (memchr(key, '\0', size) || memchr(key, '/', size)) return 0;
  if ((size == 1 && key[0] == '.') || (size == 2 && key[0] == '.' && key[1] == '.')) return 0;
  return 1;
}

static void handle_open(const struct msg_hdr *h, const unsigned char *payload, size_t plen) {
  struct open_hdr oh;
  if (plen < sizeof oh) {
    LOG("OPEN %" PRIu32 ": payload of %zu bytes is shorter than its header", h->msg_id, plen);
    n_errors++;
    copen(h->msg_id, -EINVAL);
    return;
  }
  memcpy(&oh, payload, sizeof oh);
  const unsigned char *keys = payload + sizeof oh;
  size_t keys_len = plen - sizeof oh;
  /* The key sizes must add up to the rest of the message exactly (64-bit sum: no
   * overflow), and the volume key must end with its NUL. Until they do, the fd field is
   * not trusted, so it is not closed either (as dedupd does). */
  if ((uint64_t)oh.volume_key_size + oh.cookie_key_size != keys_len ||
      oh.volume_key_size == 0 || keys[oh.volume_key_size - 1] != '\0' ||
      oh.fd > INT_MAX) {
    LOG("OPEN %" PRIu32 ": key sizes %" PRIu32 "+%" PRIu32 " do not fit %zu bytes of keys",
        h->msg_id, oh.volume_key_size, oh.cookie_key_size, keys_len);
    n_errors++;
    copen(h->msg_id, -EINVAL);
    return;
  }
  int anon_fd = (int)oh.fd;
  /* The kernel installs the fd without O_CLOEXEC. */
  fcntl(anon_fd, F_SETFD, FD_CLOEXEC);
  const unsigned char *cookie = keys + oh.volume_key_size;
  char name[NAME_MAX + 1];
  int err = 0, src_fd = -1;
  struct stat st;
  if (!valid_name(cookie, oh.cookie_key_size)) {
    err = EINVAL;
    LOG("OPEN %" PRIu32 ": the cookie key is not a file name", h->msg_id);
  } else if (n_objects == MAX_OBJECTS) {
    err = ENFILE;
    LOG("OPEN %" PRIu32 ": %d objects open already", h->msg_id, MAX_OBJECTS);
  } else {
    memcpy(name, cookie, oh.cookie_key_size);
    name[oh.cookie_key_size] = '\0';
    src_fd = openat(src_dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (src_fd < 0 || fstat(src_fd, &st) < 0) {
      err = errno;
      LOG("OPEN %" PRIu32 ": source %s: %s", h->msg_id, name, strerror(err));
    } else if (!S_ISREG(st.st_mode)) {
      err = EINVAL;
      LOG("OPEN %" PRIu32 ": source %s is not a regular file", h->msg_id, name);
    }
  }
  if (err) {
    n_errors++;
    if (src_fd >= 0) close(src_fd);
    copen(h->msg_id, -(int64_t)err);
    close(anon_fd); /* an OPEN answered with an error keeps no fd */
    return;
  }
  drop(h->object_id); /* a stale entry under a reused id, if the kernel ever reuses one */
  objects[n_objects++] = (struct object){h->object_id, src_fd, anon_fd};
  n_opens++;
  LOG("OPEN object %" PRIu32 ": %s, %jd bytes", h->object_id, name, (intmax_t)st.st_size);
  /* Registered before the reply: READs for the object may follow at once. */
  copen(h->msg_id, (int64_t)st.st_size);
}

/* pread/pwrite until all of len is done. pread stops early at the source's end: the
 * rest is zeros (a range left unwritten would read as EIO). */
static int read_full(int fd, unsigned char *p, size_t len, off_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, p + done, len - done, off + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) break;
    done += (size_t)n;
  }
  memset(p + done, 0, len - done);
  return 0;
}

static int write_full(int fd, const unsigned char *p, size_t len, off_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, p + done, len - done, off + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) {
      errno = EIO;
      return -1;
    }
    done += (size_t)n;
  }
  return 0;
}

static void handle_read(const struct msg_hdr *h, const struct read_req *r) {
  struct object *o = find(h->object_id);
  if (!o) { /* without the object's fd there is nothing to complete */
    LOG("READ %" PRIu32 " for unknown object %" PRIu32, h->msg_id, h->object_id);
    n_errors++;
    return;
  }
  n_reads++;
  /* Cache writes are O_DIRECT: whole pages at page-aligned offsets. */
  uint64_t start = r->off & ~(uint64_t)(PAGE - 1);
  uint64_t end = r->off + r->len;
  if (r->len == 0 || r->len > MAX_READ_LEN || end < r->off || end > (uint64_t)INT64_MAX - PAGE) {
    LOG("READ %" PRIu32 ": refusing range %" PRIu64 "+%" PRIu64, h->msg_id, r->off, r->len);
    n_errors++;
  } else {
    end = (end + PAGE - 1) & ~(uint64_t)(PAGE - 1);
    for (uint64_t pos = start; pos < end; pos += BUF_BYTES) {
      size_t piece = end - pos < BUF_BYTES ? (size_t)(end - pos) : BUF_BYTES;
      if (read_full(o->src_fd, buf, piece, (off_t)pos) < 0) {
        LOG("READ %" PRIu32 ": pread at %" PRIu64 ": %s", h->msg_id, pos, strerror(errno));
        n_errors++;
        break;
      }
      if (write_full(o->anon_fd, buf, piece, (off_t)pos) < 0) {
        LOG("READ %" PRIu32 ": pwrite at %" PRIu64 ": %s", h->msg_id, pos, strerror(errno));
        n_errors++;
        break;
      }
      n_bytes += piece;
    }
  }
  /* Completed whether filled or not: an unfilled range fails the reader with EIO instead
   * of leaving it waiting. EINVAL: the request is gone (reader killed); nothing to do. */
  if (ioctl(o->anon_fd, IOC_READ_COMPLETE, (unsigned long)h->msg_id) < 0 && errno != EINVAL) {
    LOG("READ_COMPLETE %" PRIu32 ": %s", h->msg_id, strerror(errno));
    n_errors++;
  }
}

/* One message, as one read(2) returned it: every length is checked before use. */
static void handle_msg(const unsigned char *m, size_t n) {
  struct msg_hdr h;
  if (n < sizeof h) {
    LOG("message of %zu bytes is shorter than its header; skipped", n);
    n_errors++;
    return;
  }
  memcpy(&h, m, sizeof h);
  if (h.len != n) {
    LOG("message %" PRIu32 " says %" PRIu32 " bytes, %zu were read; skipped", h.msg_id, h.len, n);
    n_errors++;
    if (h.opcode == OP_OPEN) copen(h.msg_id, -EINVAL); /* an OPEN waits for an answer */
    return;
  }
  const unsigned char *payload = m + sizeof h;
  size_t plen = n - sizeof h;
  struct read_req r;
  switch (h.opcode) {
  case OP_OPEN:
    handle_open(&h, payload, plen);
    break;
  case OP_CLOSE:
    if (plen != 0) {
      LOG("CLOSE with a %zu-byte payload; skipped", plen);
      n_errors++;
      break;
    }
    drop(h.object_id);
    break;
  case OP_READ:
    if (plen != sizeof r) {
      LOG("READ %" PRIu32 " with a %zu-byte payload; skipped", h.msg_id, plen);
      n_errors++;
      break;
    }
    memcpy(&r, payload, sizeof r);
    handle_read(&h, &r);
    break;
  default:
    LOG("message %" PRIu32 " has unknown opcode %" PRIu32 "; skipped", h.msg_id, h.opcode);
    n_errors++;
  }
}

/* The device allows one open system-wide: retry while a previous daemon lets go. */
static int open_device(void) {
  for (int waited = 0;; waited += 100) {
    int fd = open("/dev/cachefiles", O_RDWR | O_CLOEXEC);
    if (fd >= 0 || errno != EBUSY || waited >= BUSY_RETRY_MS) return fd;
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: fscache-naive CACHE_DIR TAG SRC_DIR\n");
    return 2;
  }
  const char *cache_dir = argv[1], *tag = argv[2], *src_dir = argv[3];
  /* The kernel takes one command per write, up to a newline; a tag is one word. */
  if (strchr(cache_dir, '\n') || !*tag || strpbrk(tag, " \t\n")) {
    LOG("CACHE_DIR may not hold a newline, TAG must be one word");
    return 2;
  }
  src_dir_fd = open(src_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (src_dir_fd < 0) {
    LOG("%s: %s", src_dir, strerror(errno));
    return 1;
  }
  if (posix_memalign((void **)&buf, PAGE, BUF_BYTES) != 0) {
    LOG("out of memory");
    return 1;
  }

  /* SIGTERM/SIGINT stay blocked except inside ppoll, so that one arriving while a
   * message is being served is seen at the next wait, never lost between check and wait. */
  sigset_t block, waitmask;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGINT);
  sigprocmask(SIG_BLOCK, &block, &waitmask);
  sigdelset(&waitmask, SIGTERM);
  sigdelset(&waitmask, SIGINT);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  dev_fd = open_device();
  if (dev_fd < 0) {
    LOG("/dev/cachefiles: %s", strerror(errno));
    return 1;
  }
  char text[PATH_MAX + 16];
  if (snprintf(text, sizeof text, "dir %s", cache_dir) >= (int)sizeof text) {
    LOG("CACHE_DIR is too long");
    return 1;
  }
  if (command(text) < 0) return 1;
  snprintf(text, sizeof text, "tag %.64s", tag);
  if (command(text) < 0 || command("bind ondemand") < 0) return 1;
  LOG("bound %s (tag %s), serving %s", cache_dir, tag, src_dir);

  static unsigned char m[MSG_MAX_SIZE];
  while (!stop) {
    struct pollfd p = {.fd = dev_fd, .events = POLLIN};
    if (ppoll(&p, 1, NULL, &waitmask) < 0) {
      if (errno == EINTR) continue; /* the handler has set stop */
      LOG("poll: %s", strerror(errno));
      return 1;
    }
    /* Drain: each read returns one message, 0 when none is queued (also right after
     * POLLIN, when another reader would have taken it; there is none here). */
    for (;;) {
      ssize_t n = read(dev_fd, m, sizeof m);
      if (n == 0) break;
      if (n < 0) {
        if (errno == EINTR) continue;
        LOG("read: %s", strerror(errno));
        return 1;
      }
      handle_msg(m, (size_t)n);
    }
  }
  LOG("stopping: %" PRIu64 " opens, %" PRIu64 " reads, %" PRIu64 " bytes written, %" PRIu64
      " errors", n_opens, n_reads, n_bytes, n_errors);
  while (n_objects > 0) drop(objects[0].id);
  close(dev_fd); /* with nothing mounted the cache unbinds */
  free(buf);
  return 0;
}
