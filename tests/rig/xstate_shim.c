/* LD_PRELOAD shim for linux.uml on hosts whose XSAVE area is larger than UML 6.1 expects.
 * The host kernel refuses PTRACE_SETREGSET(NT_X86_XSTATE) unless the buffer is exactly the
 * host's full xstate size (AVX-512, AMX); UML 6.1 passes its own, smaller struct _xstate.
 * We read the full state, overlay the part UML knows, and write the full size back, so the
 * components UML does not know about are left as the host process has them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <elf.h>
#include <errno.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define BIG 65536

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

long ptrace(enum __ptrace_request request, ...)
{
	static ptrace_fn real;
	static __thread unsigned char full[BIG] __attribute__((aligned(64)));
	va_list ap;
	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);
	if (!real)
		real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) &&
	    (unsigned long)addr == NT_X86_XSTATE) {
		struct iovec *iov = data;
		struct iovec fiov = { full, BIG };
		long r = real(PTRACE_GETREGSET, pid, addr, &fiov);
		if (r < 0)
			return r;
		size_t n = iov->iov_len < fiov.iov_len ? iov->iov_len : fiov.iov_len;
		if (request == PTRACE_GETREGSET) {
			memcpy(iov->iov_base, full, n);
			iov->iov_len = n;
			return 0;
		}
		memcpy(full, iov->iov_base, n);
		return real(PTRACE_SETREGSET, pid, addr, &fiov);
	}
	return real(request, pid, addr, data);
}
