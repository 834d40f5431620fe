/* cgroup/connect4 and cgroup/connect6: send an app's outbound TCP connect() to the
 * sidecar on loopback instead of its destination, and remember that destination.
 * Replaces istio-iptables' `-A ISTIO_OUTPUT ... -j REDIRECT --to-ports 15001`. */
#include "helpers.h"

#define MA_IPPROTO_TCP 6

/* Decides whether to capture this connect() and, if so, remembers the original
 * destination. Returns the sidecar port to rewrite to, or 0 to leave the call alone.
 * The caller does the rewrite: a connect4 program may only write user_ip4, a connect6
 * program only user_ip6. When in doubt we don't capture (we never refuse a connect()). */
static __always_inline __u16 capture(struct bpf_sock_addr *ctx, const __u32 dst[4], __u16 dst_port,
				     __u16 family)
{
	struct ma_config *cfg = config();
	__u32 uid = bpf_get_current_uid_gid() & 0xffffffff;
	__u64 cookie;
	struct orig_dst od = {};

	if (!cfg)
		return 0;
	if (ctx->protocol != MA_IPPROTO_TCP) {
		count(CNT_CONNECT_SKIPPED_NOT_TCP, 1);
		return 0;
	}
	if (uid == cfg->proxy_uid) {
		count(CNT_CONNECT_SKIPPED_PROXY_UID, 1);
		return 0;
	}
	if (is_loopback(dst)) {
		count(CNT_CONNECT_SKIPPED_LOOPBACK, 1);
		return 0;
	}

	__builtin_memcpy(od.ip, dst, sizeof(od.ip));
	od.port = dst_port;
	od.family = family;
	cookie = bpf_get_socket_cookie(ctx);
	long err = orig_dst_by_cookie.update(&cookie, &od);

	if (err) {
		count(CNT_CONNECT_RECORD_FAILED, 1);
		return 0; /* without the original destination the sidecar could not route it */
	}
	count(CNT_CONNECT_CAPTURED, 1);
	return cfg->proxy_port;
}

int ma_connect4(struct bpf_sock_addr *ctx)
{
	__u32 dst[4];
	__u16 proxy_port;

	ip4_to_mapped(ctx->user_ip4, dst);
	proxy_port = capture(ctx, dst, bpf_ntohs(ctx->user_port), MA_AF_INET);
	if (proxy_port) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(proxy_port);
	}
	return 1;
}

int ma_connect6(struct bpf_sock_addr *ctx)
{
	__u32 dst[4];
	__u16 proxy_port;
	int v4_mapped;

	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	v4_mapped = is_v4_mapped(dst);
	proxy_port = capture(ctx, dst, bpf_ntohs(ctx->user_port), v4_mapped ? MA_AF_INET : MA_AF_INET6);
	if (proxy_port) {
		/* a v4-mapped destination stays in v4 space: ::ffff:127.0.0.1, else ::1 */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = v4_mapped ? bpf_htonl(0x0000ffff) : 0;
		ctx->user_ip6[3] = v4_mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(proxy_port);
	}
	return 1;
}
