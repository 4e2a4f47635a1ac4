/*
 * Preload shim for running MLX's CPU backend (mlx[cpu] on Linux) on OpenBLAS.
 * Built by benchmarks/cpu/with_openblas.sh into a cache dir; never committed as a binary.
 *
 * 1. Its constructor removes LD_PRELOAD from the environment once this process has started, so
 *    child processes (the benchmarks' upstream PyTorch subprocess in the oracle venv) run on their
 *    own BLAS. Without this, torch's exported MKL symbols (sgemm_, sgesdd_, ...) would be
 *    interposed by OpenBLAS too, and the "upstream" baseline would no longer be upstream.
 *    Set MLX_OPENBLAS_INHERIT=1 to keep LD_PRELOAD for children.
 *
 * 2. Built with -DSCIPY_PREFIX (the pip route: the scipy-openblas32 wheel, whose symbols carry a
 *    "scipy_" prefix), it also exports the unprefixed CBLAS/LAPACK names that libmlx.so imports
 *    (nm -D --undefined-only libmlx.so) as tail-jump trampolines to scipy_<name>: arguments are
 *    untouched, so no prototypes are needed. With a system libopenblas.so.0 (Debian/Ubuntu
 *    libopenblas0-pthread, Fedora openblas) the names are already unprefixed and this part is off.
 */
#include <stdlib.h>

__attribute__((constructor)) static void mlx_openblas_drop_preload(void) {
    const char *keep = getenv("MLX_OPENBLAS_INHERIT");
    if (!(keep && keep[0] == '1')) unsetenv("LD_PRELOAD");
}

#ifdef SCIPY_PREFIX
/* Every BLAS/LAPACK symbol libmlx.so 0.32.x imports; with_openblas.sh checks the list still covers
 * the installed libmlx.so. */
#define MLX_BLAS_SYMBOLS(X) \
    X(cblas_sgemm) X(cblas_dgemm) X(cblas_cgemm) \
    X(sgeev_) X(dgeev_) X(cgeev_) \
    X(sgesdd_) X(dgesdd_) X(cgesdd_) \
    X(ssyevd_) X(dsyevd_) X(cheevd_) \
    X(sgeqrf_) X(dgeqrf_) X(sorgqr_) X(dorgqr_) \
    X(sgetrf_) X(dgetrf_) X(sgetri_) X(dgetri_) \
    X(spotrf_) X(dpotrf_) X(strtri_) X(dtrtri_)

#if defined(__x86_64__)
#define TRAMPOLINE(name)                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" \
            #name ":\n\tjmp scipy_" #name "@PLT\n"       \
            ".size " #name ", .-" #name "\n");
#elif defined(__aarch64__)
#define TRAMPOLINE(name)                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",%function\n" \
            #name ":\n\tb scipy_" #name "\n"             \
            ".size " #name ", .-" #name "\n");
#else
#error "trampolines written for x86_64 and aarch64 only"
#endif

MLX_BLAS_SYMBOLS(TRAMPOLINE)

#endif
