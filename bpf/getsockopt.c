/* cgroup/getsockopt: answer SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST) on the sidecar's
 * accepted socket from orig_dst_by_sock, as conntrack would after an iptables REDIRECT,
 * so Envoy's original_dst listener filter works unmodified. Runs after the kernel's own
 * getsockopt: that fails with ENOENT where no conntrack entry exists; where one exists
 * (the pod has nat rules) it answers the pre-NAT destination, which we leave alone but for
 * connections connect4/6 captured (it saw a rewritten one only after the rewrite). */
#include "helpers.h"

#define MA_SOL_IP 0
#define MA_SOL_IPV6 41
#define MA_SO_ORIGINAL_DST 80      /* linux/netfilter_ipv4.h */
#define MA_IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */

struct ma_sockaddr_in {
	__u16 family;
	__u16 port; /* network order */
	__u32 addr;
	__u8 zero[8];
};

struct ma_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

int ma_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_key self = {};
	struct sock_key peer = {};
	struct orig_dst local = {};
	struct orig_dst *od;
	__u64 netns;
	int v4 = ctx->level == MA_SOL_IP && ctx->optname == MA_SO_ORIGINAL_DST;
	int v6 = ctx->level == MA_SOL_IPV6 && ctx->optname == MA_IP6T_SO_ORIGINAL_DST;

	if (!v4 && !v6) {
		/* not ours: leave it as the kernel answered. Past one page the program sees a
		 * truncated buffer; optlen 0 tells the kernel to ignore our copy. */
		if (ctx->optlen > MA_PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	if (!sk)
		return 1;

	/* the connecting socket's key: the same connection from its end */
	SOCK_KEY_FROM_SK(&self, sk, ctx);
	netns = bpf_get_netns_cookie(ctx); /* (self's is 0 for two pod addresses) */
	peer_key(&self, &peer);
	od = orig_dst_by_sock.lookup(&peer);
	if (!od && ctx->retval == 0) {
		/* conntrack answered: the pod has nat rules, and the connection is not one
		 * connect4/6 rewrote (those are in the map), so the NAT knows best */
		count(CNT_ORIG_DST_BY_CONNTRACK, 1);
		return 1;
	}
	if (od)
		od->flags |= OD_ASKED;
	if (!od && (pod_config.lookup((struct ip_key *)self.local_ip) ||
		    (!is_loopback(self.local_ip) && pod_by_netns.lookup(&netns)))) {
		/* accepted for a registered pod's own address, or another local non-loopback
		 * address of its netns (added after pod add, AnyIP): handed over by sk_lookup
		 * without NAT, so the original destination is the local address (conntrack
		 * answers the same for a pod with istio-iptables rules) */
		__builtin_memcpy(local.ip, self.local_ip, sizeof(local.ip));
		local.port = self.local_port;
		local.family = is_v4_mapped(self.local_ip) ? MA_AF_INET : MA_AF_INET6;
		od = &local;
	}
	if (!od) {
		count(CNT_ORIG_DST_NOT_FOUND, 1);
		return 1;
	}

	if (v4) {
		struct ma_sockaddr_in *sin = ctx->optval;

		if (od->family != MA_AF_INET || (void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->family = MA_AF_INET;
		sin->port = bpf_htons(od->port);
		sin->addr = od->ip[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct ma_sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = MA_AF_INET6;
		sin6->port = bpf_htons(od->port);
		sin6->flowinfo = 0;
		sin6->addr[0] = od->ip[0];
		sin6->addr[1] = od->ip[1];
		sin6->addr[2] = od->ip[2];
		sin6->addr[3] = od->ip[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	count(CNT_ORIG_DST_ANSWERED, 1);
	return 1;
}
