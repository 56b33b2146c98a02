/*
 * ggc-ota's launcher: the first part of the static binary. The rest of the file is a payload
 * (the agent frozen by PyInstaller as a directory, with the C libraries it needs, as one xz
 * stream), a manifest (each file's name, mode, size and CRC-64) and a trailer that locates both.
 *
 * The libraries are unpacked once per version, beside the binary, into a directory named after
 * the manifest's hash (<dir of the binary>/.ggc-ota-<id>), and verified there at every start
 * against the manifest (sizes and CRC-64 of every file): a start that finds them in place writes
 * nothing. They are page cache there, which the kernel can drop, instead of a tmpfs copy that it
 * never can. An unpack is written to a temporary directory, each file synced, then renamed into
 * place: a power cut leaves either the whole directory or none. A copy that fails verification is
 * removed and unpacked again, never run. Where the binary's directory takes no unpack (read-only,
 * full), the libraries go into TMPDIR instead (<TMPDIR>/ggc-ota-<pid>, removed by the agent when
 * it exits, or by a later start once that pid is gone), and the agent says so.
 *
 * Then the launcher becomes the agent, with exec (no process stays behind): the unpacked C
 * library's loader runs PyInstaller's bootloader with --library-path pointing at the directory.
 * The agent learns how it was started from GGC_OTA_LAUNCHER_EXE (this binary),
 * GGC_OTA_LAUNCHER_LIBS (the directory) and GGC_OTA_LAUNCHER_MODE (flash, flash-new or
 * "tmpdir: <why not beside the binary>").
 *
 * Exit codes of its own: 1 when the libraries can be unpacked nowhere (the message says where it
 * tried and why), 70 when the binary itself is damaged.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <lzma.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <unistd.h>

#define TRAILER_MAGIC "GGCOTAL1"
#define TRAILER_SIZE 64
#define MAX_MANIFEST (64 * 1024)
#define MAX_FILES 256
#define CHUNK (256 * 1024)
#define EXIT_DAMAGED 70

struct entry {
    char name[128];
    unsigned mode;
    uint64_t size;
    uint64_t crc;
};

struct manifest {
    char text[MAX_MANIFEST + 1];
    size_t length;
    char loader[128];
    char program[128];
    char id[17];
    struct entry files[MAX_FILES];
    int count;
    uint64_t total;
};

struct payload {
    int fd;
    uint64_t offset, length;
};

static struct manifest M;
static char why_not[512];  /* why the last attempt failed, for the user */

static void fail(int code, const char *format, ...)
{
    va_list args;
    fputs("ggc-ota: ", stderr);
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fputc('\n', stderr);
    exit(code);
}

static void note(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(why_not, sizeof why_not, format, args);
    va_end(args);
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int read_all(int fd, void *buf, size_t n, off_t at)
{
    size_t done = 0;
    while (done < n) {
        ssize_t got = pread(fd, (char *)buf + done, n - done, at + (off_t)done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        done += (size_t)got;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t put = write(fd, (const char *)buf + done, n - done);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return -1;
        done += (size_t)put;
    }
    return 0;
}

static int safe_name(const char *name)
{
    return name[0] && name[0] != '.' && !strchr(name, '/') && strlen(name) < sizeof M.files[0].name;
}

/* The manifest: "ggc-ota-libraries 1", "id <16 hex>", "loader <name>", "program <name>", then
 * "file <octal mode> <size> <crc64 hex> <name>" for each file, in the payload's order. */
static void parse_manifest(void)
{
    char *save = NULL, *line, copy[MAX_MANIFEST + 1];
    memcpy(copy, M.text, M.length + 1);
    line = strtok_r(copy, "\n", &save);
    if (!line || strcmp(line, "ggc-ota-libraries 1") != 0)
        fail(EXIT_DAMAGED, "this binary is damaged: its library manifest has no known format");
    for (line = strtok_r(NULL, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        struct entry *e = &M.files[M.count];
        unsigned long long size, crc;
        if (sscanf(line, "id %16s", M.id) == 1 || sscanf(line, "loader %127s", M.loader) == 1 ||
            sscanf(line, "program %127s", M.program) == 1)
            continue;
        if (M.count == MAX_FILES || sscanf(line, "file %o %llu %llx %127s", &e->mode, &size, &crc, e->name) != 4 ||
            !safe_name(e->name))
            fail(EXIT_DAMAGED, "this binary is damaged: a line of its library manifest is not valid: %.80s", line);
        e->size = size;
        e->crc = crc;
        M.total += size;
        M.count++;
    }
    if (strlen(M.id) != 16 || !safe_name(M.loader) || !safe_name(M.program) || M.count == 0)
        fail(EXIT_DAMAGED, "this binary is damaged: its library manifest is incomplete");
}

static void read_trailer(const char *exe, struct payload *p)
{
    unsigned char t[TRAILER_SIZE];
    struct stat st;
    p->fd = open(exe, O_RDONLY | O_CLOEXEC);
    if (p->fd < 0 || fstat(p->fd, &st) < 0)
        fail(EXIT_DAMAGED, "cannot read this binary (%s): %s", exe, strerror(errno));
    if (st.st_size < TRAILER_SIZE || read_all(p->fd, t, TRAILER_SIZE, st.st_size - TRAILER_SIZE) < 0 ||
        memcmp(t, TRAILER_MAGIC, 8) != 0)
        fail(EXIT_DAMAGED, "this binary is damaged or truncated (%s: no payload trailer)", exe);
    p->offset = get_u64(t + 8);
    p->length = get_u64(t + 16);
    uint64_t moff = get_u64(t + 24), mlen = get_u64(t + 32);
    if (mlen > MAX_MANIFEST || moff + mlen > (uint64_t)st.st_size || p->offset + p->length > moff)
        fail(EXIT_DAMAGED, "this binary is damaged or truncated (%s: the trailer points outside it)", exe);
    if (read_all(p->fd, M.text, (size_t)mlen, (off_t)moff) < 0)
        fail(EXIT_DAMAGED, "cannot read this binary's library manifest: %s", strerror(errno));
    M.text[mlen] = 0;
    M.length = (size_t)mlen;
    parse_manifest();
}

/* Whether <dir> holds exactly what the manifest says: the same manifest, and every file a
 * regular file (not a link) of its size, mode and CRC-64. Reads every byte. */
static int verified(const char *dir)
{
    char path[PATH_MAX], *buf = malloc(CHUNK);
    int ok = 0;
    if (!buf)
        return 0;
    snprintf(path, sizeof path, "%s/.manifest", dir);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        note("%s: %s", path, strerror(errno));
        goto out;
    }
    ssize_t got = read(fd, buf, CHUNK);
    close(fd);
    if (got != (ssize_t)M.length || memcmp(buf, M.text, M.length) != 0) {
        note("%s is not this version's", path);
        goto out;
    }
    for (int i = 0; i < M.count; i++) {
        struct entry *e = &M.files[i];
        struct stat st;
        uint64_t crc = 0, seen = 0;
        snprintf(path, sizeof path, "%s/%s", dir, e->name);
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != e->size ||
            (st.st_mode & 07777) != e->mode) {
            note("%s is missing, or not the file this version unpacked", path);
            if (fd >= 0)
                close(fd);
            goto out;
        }
        while ((got = read(fd, buf, CHUNK)) > 0) {
            crc = lzma_crc64((const uint8_t *)buf, (size_t)got, crc);
            seen += (uint64_t)got;
        }
        close(fd);
        if (got < 0 || seen != e->size || crc != e->crc) {
            note("%s is damaged (its CRC-64 is not the manifest's)", path);
            goto out;
        }
    }
    ok = 1;
out:
    free(buf);
    return ok;
}

static void remove_flat_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    char path[PATH_MAX];
    if (d) {
        while ((de = readdir(d)) != NULL) {
            if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* A new file <dir>/<name> for writing (its path left in `path`), or -1 with why_not set. */
static int create_file(const char *dir, const char *name, char *path, size_t size)
{
    snprintf(path, size, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        note("%s: %s", path, strerror(errno));
    return fd;
}

/* Decode the payload into `dir` (which exists and is empty), file by file in manifest order,
 * each checked against its CRC-64 as it is written; `durable`: each file synced, then the
 * directory. Returns 0, or -1 with why_not set. */
static int unpack(const struct payload *p, const char *dir, int durable)
{
    lzma_stream z = LZMA_STREAM_INIT;
    uint8_t *in = malloc(CHUNK), *out = malloc(CHUNK);
    uint64_t read_at = 0;
    int rc = -1, fd = -1, i = 0;
    uint64_t left = M.count ? M.files[0].size : 0, crc = 0;
    char path[PATH_MAX];
    if (!in || !out || lzma_stream_decoder(&z, 64u << 20, LZMA_CONCATENATED) != LZMA_OK) {
        note("out of memory");
        goto out;
    }
    z.next_out = out;
    z.avail_out = CHUNK;
    for (;;) {
        if (z.avail_in == 0 && read_at < p->length) {
            size_t n = p->length - read_at < CHUNK ? (size_t)(p->length - read_at) : CHUNK;
            if (read_all(p->fd, in, n, (off_t)(p->offset + read_at)) < 0) {
                note("cannot read this binary's payload: %s", strerror(errno));
                goto out;
            }
            z.next_in = in;
            z.avail_in = n;
            read_at += n;
        }
        lzma_ret ret = lzma_code(&z, read_at < p->length ? LZMA_RUN : LZMA_FINISH);
        size_t have = CHUNK - z.avail_out;
        uint8_t *cursor = out;
        while (have > 0) {
            if (i == M.count) {
                note("this binary's payload is longer than its manifest says");
                goto out;
            }
            if (fd < 0 && (fd = create_file(dir, M.files[i].name, path, sizeof path)) < 0)
                goto out;
            size_t n = have < left ? have : (size_t)left;
            if (write_all(fd, cursor, n) < 0) {
                note("%s: %s", path, strerror(errno));
                goto out;
            }
            crc = lzma_crc64(cursor, n, crc);
            cursor += n;
            have -= n;
            left -= n;
            while (fd >= 0 && left == 0) {  /* a file is whole (an empty one at once) */
                if (crc != M.files[i].crc) {
                    note("this binary's payload is damaged (%s: CRC-64 mismatch)", M.files[i].name);
                    goto out;
                }
                if (fchmod(fd, M.files[i].mode) < 0 || (durable && fsync(fd) < 0) || close(fd) < 0) {
                    fd = -1;
                    note("%s: %s", path, strerror(errno));
                    goto out;
                }
                fd = -1;
                crc = 0;
                if (++i < M.count) {
                    left = M.files[i].size;
                    if (left == 0 && (fd = create_file(dir, M.files[i].name, path, sizeof path)) < 0)
                        goto out;
                }
            }
        }
        z.next_out = out;
        z.avail_out = CHUNK;
        if (ret == LZMA_STREAM_END)
            break;
        if (ret != LZMA_OK) {
            note("this binary's payload cannot be decoded (liblzma error %d)", (int)ret);
            goto out;
        }
    }
    if (i != M.count) {
        note("this binary's payload is shorter than its manifest says");
        goto out;
    }
    snprintf(path, sizeof path, "%s/.manifest", dir);
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 || write_all(fd, M.text, M.length) < 0 || (durable && fsync(fd) < 0) || close(fd) < 0) {
        note("%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        fd = -1;
        goto out;
    }
    fd = -1;
    if (durable && sync_dir(dir) < 0) {
        note("%s: %s", dir, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    lzma_end(&z);
    free(in);
    free(out);
    return rc;
}

static int pid_alive(const char *digits)
{
    char *end;
    long pid = strtol(digits, &end, 10);
    if (*end || pid <= 0)
        return 1;  /* not ours to judge */
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

/* Beside the binary: other versions' directories (a binary replaced in place) and unpacks a
 * power cut or a kill interrupted (<name>.tmp-<pid> whose pid is gone). */
static void remove_leftovers_beside(const char *exe_dir, const char *keep)
{
    DIR *d = opendir(exe_dir);
    struct dirent *de;
    char path[PATH_MAX];
    if (!d)
        return;
    while ((de = readdir(d)) != NULL) {
        const char *tmp = strstr(de->d_name, ".tmp-");
        if (strncmp(de->d_name, ".ggc-ota-", 9) != 0 || strcmp(de->d_name, keep) == 0)
            continue;
        if (tmp && pid_alive(tmp + 5))
            continue;
        snprintf(path, sizeof path, "%s/%s", exe_dir, de->d_name);
        remove_flat_dir(path);
    }
    closedir(d);
}

/* In TMPDIR: the directories of agents that are gone (ggc-ota-<pid>), which a full TMPDIR would
 * otherwise keep full. */
static void remove_leftovers_in(const char *tmpdir)
{
    DIR *d = opendir(tmpdir);
    struct dirent *de;
    char path[PATH_MAX];
    struct stat st;
    if (!d)
        return;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "ggc-ota-", 8) != 0 || pid_alive(de->d_name + 8))
            continue;
        snprintf(path, sizeof path, "%s/%s", tmpdir, de->d_name);
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid())
            remove_flat_dir(path);
    }
    closedir(d);
}

/* Unpack beside the binary, durably, into <final>.tmp-<pid>, then rename it into place. */
static int unpack_beside(const struct payload *p, const char *exe_dir, const char *final)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", final, (int)getpid());
    remove_flat_dir(tmp);
    if (mkdir(tmp, 0755) < 0) {
        note("%s: %s", tmp, strerror(errno));
        return -1;
    }
    if (unpack(p, tmp, 1) < 0) {
        remove_flat_dir(tmp);
        return -1;
    }
    if (rename(tmp, final) < 0) {
        int err = errno;
        remove_flat_dir(tmp);
        if ((err == EEXIST || err == ENOTEMPTY) && verified(final))
            return 0;  /* another start of this version unpacked it meanwhile */
        note("%s: %s", final, strerror(err));
        return -1;
    }
    if (sync_dir(exe_dir) < 0) {
        note("%s: %s", exe_dir, strerror(errno));
        return -1;
    }
    return 0;
}

static void become_agent(const char *dir, const char *exe, const char *mode, int argc, char **argv)
{
    char loader[PATH_MAX], program[PATH_MAX];
    char **args = calloc((size_t)argc + 6, sizeof *args);
    snprintf(loader, sizeof loader, "%s/%s", dir, M.loader);
    snprintf(program, sizeof program, "%s/%s", dir, M.program);
    if (!args)
        fail(1, "out of memory");
    setenv("GGC_OTA_LAUNCHER_EXE", exe, 1);
    setenv("GGC_OTA_LAUNCHER_LIBS", dir, 1);
    setenv("GGC_OTA_LAUNCHER_MODE", mode, 1);
    args[0] = loader;
    args[1] = "--inhibit-cache";
    args[2] = "--library-path";
    args[3] = (char *)dir;
    args[4] = program;
    for (int i = 1; i < argc; i++)
        args[4 + i] = argv[i];
    execv(loader, args);
    fail(1, "cannot run the agent from %s: %s", dir, strerror(errno));
}

int main(int argc, char **argv)
{
    char exe[PATH_MAX], exe_dir[PATH_MAX], name[64], final[PATH_MAX], tmpdir_libs[PATH_MAX], mode[700];
    char beside_why[512];
    struct payload p;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        fail(1, "cannot find this binary (/proc/self/exe: %s): is /proc mounted?", strerror(errno));
    exe[n] = 0;
    if (n > PATH_MAX - 256)  /* every path below is built from it, with room to spare */
        fail(1, "the path of this binary is too long (%zd bytes): %.80s...", n, exe);
    read_trailer(exe, &p);
    snprintf(exe_dir, sizeof exe_dir, "%s", exe);
    *strrchr(exe_dir, '/') = 0;
    if (!exe_dir[0])
        strcpy(exe_dir, "/");
    snprintf(name, sizeof name, ".ggc-ota-%s", M.id);
    snprintf(final, sizeof final, "%s/%s", exe_dir, name);

    if (verified(final)) {
        remove_leftovers_beside(exe_dir, name);
        become_agent(final, exe, "flash", argc, argv);
    }
    remove_flat_dir(final);  /* absent, partial or damaged: never run, unpacked again */
    if (unpack_beside(&p, exe_dir, final) == 0 && verified(final)) {
        remove_leftovers_beside(exe_dir, name);
        become_agent(final, exe, "flash-new", argc, argv);
    }
    snprintf(beside_why, sizeof beside_why, "%s", why_not);

    const char *tmpdir = getenv("TMPDIR");
    if (!tmpdir || !*tmpdir || strlen(tmpdir) > PATH_MAX - 256)
        tmpdir = "/tmp";
    remove_leftovers_in(tmpdir);
    snprintf(tmpdir_libs, sizeof tmpdir_libs, "%s/ggc-ota-%d", tmpdir, (int)getpid());
    remove_flat_dir(tmpdir_libs);
    if (mkdir(tmpdir_libs, 0700) < 0) {
        note("%s: %s", tmpdir_libs, strerror(errno));
    } else if (unpack(&p, tmpdir_libs, 0) == 0) {
        snprintf(mode, sizeof mode, "tmpdir: %s", beside_why);
        become_agent(tmpdir_libs, exe, mode, argc, argv);
    } else {
        remove_flat_dir(tmpdir_libs);
    }
    fail(1, "cannot unpack the agent's libraries (%.1f MiB) anywhere: beside the binary (%s), nor into TMPDIR "
         "(%s); free room in one of them, or point TMPDIR at a directory with room",
         (double)M.total / (1 << 20), beside_why, why_not);
    return 1;
}
