/* sk_lookup, attached to each registered pod's netns: a TCP connection arriving for the
 * pod (from another pod, another node or the node itself) on a port its ISTIO_INBOUND
 * rules capture is handed to the sidecar's inbound listener (15006), as istio-iptables'
 * PREROUTING REDIRECT would. Chosen over TC rewriting because nothing is NATed: the
 * accepted socket keeps podIP:port as its local address, so there is no reverse
 * translation to get wrong, and SO_ORIGINAL_DST is simply that address. */
#include "helpers.h"

#define MA_IPPROTO_TCP 6

/* The netns cookie the pod's tag program wrote for this very lookup, or 0. Read and
 * cleared first thing, so that no value outlives the lookup it was written for. */
static __always_inline __u64 take_tag(struct lookup_tag *tag)
{
	__u32 zero = 0;
	struct lookup_tag *t = sk_lookup_netns.lookup(&zero);

	if (!t)
		return 0;
	__builtin_memcpy(tag, t, sizeof(*tag));
	__builtin_memset(t, 0, sizeof(*t));
	return tag->netns_cookie;
}

int ma_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct lookup_tag tag = {};
	struct ip_key dst = {};
	struct conn c = {};
	const struct capture_rule *r;
	struct pod_config *pod = 0;
	struct bpf_sock *sk;
	__u64 cookie = take_tag(&tag);

	if (ctx->protocol != MA_IPPROTO_TCP)
		return SK_PASS;
	if (CTX_LOAD32(ctx, family) == MA_AF_INET) {
		ip4_to_mapped(CTX_LOAD32(ctx, local_ip4), dst.ip);
		ip4_to_mapped(CTX_LOAD32(ctx, remote_ip4), c.src);
		c.family = 4;
	} else {
		dst.ip[0] = CTX_LOAD32(ctx, local_ip6[0]);
		dst.ip[1] = CTX_LOAD32(ctx, local_ip6[1]);
		dst.ip[2] = CTX_LOAD32(ctx, local_ip6[2]);
		dst.ip[3] = CTX_LOAD32(ctx, local_ip6[3]);
		c.src[0] = CTX_LOAD32(ctx, remote_ip6[0]);
		c.src[1] = CTX_LOAD32(ctx, remote_ip6[1]);
		c.src[2] = CTX_LOAD32(ctx, remote_ip6[2]);
		c.src[3] = CTX_LOAD32(ctx, remote_ip6[3]);
		c.family = 6;
	}
	/* By its netns when the tag is this lookup's: PREROUTING captures whatever local
	 * address the connection is for, also one pod add did not register (added later,
	 * AnyIP). A pod linked without a tag program (by a release before): by address. */
	if (cookie && tag.family == CTX_LOAD32(ctx, family) &&
	    tag.local_port == CTX_LOAD32(ctx, local_port) &&
	    tag.remote_port == bpf_ntohs(ctx->remote_port) && ip_eq(tag.remote_ip, c.src)) {
		struct ip_key *any = pod_by_netns.lookup(&cookie);

		if (any)
			pod = pod_config.lookup(any);
	}
	if (!pod)
		pod = pod_config.lookup(&dst);
	if (!pod)
		return SK_PASS;
	/* The pod calling itself never meets PREROUTING: connect4/6 decided already. That
	 * includes Envoy's IPv6 inbound passthrough from ::6 (on lo, but not loopback), and
	 * a call to an address of its own pod add did not register (the source is then that
	 * address). */
	if (is_loopback(c.src) || is_local_to_pod(pod->netns_cookie, c.src) || ip_eq(c.src, dst.ip) ||
	    (!c.src[0] && !c.src[1] && !c.src[2] && c.src[3] == bpf_htonl(6)))
		return SK_PASS;
	__builtin_memcpy(c.dst, dst.ip, sizeof(c.dst));
	c.dport = CTX_LOAD32(ctx, local_port);
	c.uid = c.gid = 0xffffffff; /* PREROUTING has no owner */
	r = first_match(pod->inbound, pod->n_inbound, &c);
	if (!r || r->action != RA_IN_REDIRECT)
		return SK_PASS;

	sk = (struct bpf_sock *)inbound_listener.lookup(listener_key(pod, c.family));
	if (!sk) {
		/* no sidecar listening (restarting, not up yet): refused, as istio-iptables'
		 * REDIRECT to a port nobody listens on refuses it. Never to the app: that would
		 * skip the sidecar's policy. */
		count(CNT_INBOUND_NO_LISTENER, 1);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);

	bpf_sk_release(sk);
	count(err ? CNT_INBOUND_ASSIGN_FAILED : CNT_INBOUND_CAPTURED, 1);
	return SK_PASS;
}
