/* cgroup/getpeername4 and getpeername6: a captured app asking whom its socket is
 * connected to gets the destination it connected to, not the sidecar on loopback, as it
 * would after an iptables REDIRECT (NAT is invisible to the app). */
#include "helpers.h"

/* The original destination of the app socket behind ctx, or NULL if not captured. */
static __always_inline struct orig_dst *captured_dst(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_key key = {};

	if (!sk)
		return 0;
	SOCK_KEY_FROM_SK(&key, sk, ctx);
	return orig_dst_by_sock.lookup(&key);
}

int ma_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = captured_dst(ctx);

	if (od && od->family == MA_AF_INET) {
		ctx->user_ip4 = od->ip[3];
		ctx->user_port = bpf_htons(od->port);
	}
	return 1;
}

int ma_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = captured_dst(ctx);

	if (od) {
		ctx->user_ip6[0] = od->ip[0];
		ctx->user_ip6[1] = od->ip[1];
		ctx->user_ip6[2] = od->ip[2];
		ctx->user_ip6[3] = od->ip[3];
		ctx->user_port = bpf_htons(od->port);
	}
	return 1;
}
