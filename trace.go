package main

// trace.go carries W3C Trace Context (https://www.w3.org/TR/trace-context/)
// across the service: from a request's traceparent, through the outbox row,
// into the pay-order record's headers; and from a payment-results record's
// headers to the log line that applies it. Every log line of a request
// carries its trace_id and request_id. No tracing library: the header is 55
// characters, and the binary may depend on pgx and franz-go only.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"
)

// traceParent is a parsed traceparent header.
type traceParent struct {
	TraceID [16]byte
	SpanID  [8]byte // the parent-id field: the span that sent it
	Flags   byte
}

// traceparentLen is the length of a version 00 traceparent.
const traceparentLen = 55

// parseTraceparent accepts what the W3C rules accept: lowercase hex fields of
// exact lengths, a version other than ff, trace and parent ids that are not
// all zeros, and for version 00 nothing after the flags. A later version may
// carry more fields after a '-'; its first four are read as version 00's.
func parseTraceparent(s string) (traceParent, bool) {
	var t traceParent
	if len(s) < traceparentLen || s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return t, false
	}
	version, ok := lowerHex(s[0:2])
	switch {
	case !ok || version[0] == 0xff:
		return t, false
	case version[0] == 0 && len(s) != traceparentLen:
		return t, false
	case len(s) > traceparentLen && s[traceparentLen] != '-':
		return t, false
	}
	trace, ok1 := lowerHex(s[3:35])
	span, ok2 := lowerHex(s[36:52])
	flags, ok3 := lowerHex(s[53:55])
	if !ok1 || !ok2 || !ok3 || allZero(trace) || allZero(span) {
		return t, false
	}
	copy(t.TraceID[:], trace)
	copy(t.SpanID[:], span)
	t.Flags = flags[0]
	return t, true
}

func lowerHex(s string) ([]byte, bool) {
	if strings.ToLower(s) != s {
		return nil, false
	}
	b, err := hex.DecodeString(s)
	return b, err == nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// String is the version 00 header.
func (t traceParent) String() string {
	return "00-" + hex.EncodeToString(t.TraceID[:]) + "-" + hex.EncodeToString(t.SpanID[:]) + "-" + hex.EncodeToString([]byte{t.Flags})
}

func (t traceParent) traceID() string { return hex.EncodeToString(t.TraceID[:]) }

// hop is this service's span in the trace of parent, or the first span of a
// new trace when there is no valid parent (then sampled: this service records
// it in its logs).
func hop(parent traceParent, ok bool) traceParent {
	t := parent
	if !ok {
		t = traceParent{Flags: 0x01}
		rand.Read(t.TraceID[:])
	}
	rand.Read(t.SpanID[:])
	return t
}

// maxTracestate is what the W3C rules ask a vendor to propagate at least; a
// longer or malformed tracestate is dropped, never cut.
const maxTracestate = 512

// cleanTracestate keeps tracestate when it is plausible: printable ASCII
// within maxTracestate. Its list members are other vendors' business.
func cleanTracestate(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > maxTracestate {
		return ""
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return ""
		}
	}
	return s
}

// requestInfo is what every log line of a request carries.
type requestInfo struct {
	span       traceParent // this service's hop
	tracestate string
	requestID  string
}

type requestInfoKey struct{}

func withRequestInfo(ctx context.Context, ri *requestInfo) context.Context {
	return context.WithValue(ctx, requestInfoKey{}, ri)
}

func requestInfoFrom(ctx context.Context) (*requestInfo, bool) {
	ri, ok := ctx.Value(requestInfoKey{}).(*requestInfo)
	return ri, ok
}

// maxRequestID bounds an X-Request-Id taken from the client.
const maxRequestID = 128

// traceRequests reads traceparent, tracestate and X-Request-Id (or starts a
// trace and makes an id), echoes X-Request-Id, and puts both in the request's
// context for the log lines and the outbox row.
func traceRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		parent, ok := parseTraceparent(r.Header.Get("traceparent"))
		ri := &requestInfo{span: hop(parent, ok)}
		if ok {
			ri.tracestate = cleanTracestate(strings.Join(r.Header.Values("tracestate"), ","))
		}
		ri.requestID = r.Header.Get("X-Request-Id")
		if !printable(ri.requestID, maxRequestID) {
			var b [16]byte
			rand.Read(b[:])
			ri.requestID = hex.EncodeToString(b[:])
		}
		w.Header().Set("X-Request-Id", ri.requestID)
		next.ServeHTTP(w, r.WithContext(withRequestInfo(r.Context(), ri)))
	})
}

// contextHandler adds the trace_id and request_id of the context to each
// record: a handler need not pass them to every log call, only its context.
type contextHandler struct{ slog.Handler }

func (h contextHandler) Handle(ctx context.Context, r slog.Record) error {
	if ri, ok := requestInfoFrom(ctx); ok {
		r.AddAttrs(slog.String("trace_id", ri.span.traceID()))
		if ri.requestID != "" {
			r.AddAttrs(slog.String("request_id", ri.requestID))
		}
	}
	return h.Handler.Handle(ctx, r)
}

func (h contextHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return contextHandler{h.Handler.WithAttrs(attrs)}
}

func (h contextHandler) WithGroup(name string) slog.Handler {
	return contextHandler{h.Handler.WithGroup(name)}
}

// recordTrace reads the traceparent header of a Kafka record: the context of
// the log lines that handle it.
func recordTrace(ctx context.Context, headers []kgo.RecordHeader) context.Context {
	for _, h := range headers {
		if h.Key == "traceparent" {
			if t, ok := parseTraceparent(string(h.Value)); ok {
				return withRequestInfo(ctx, &requestInfo{span: t})
			}
		}
	}
	return ctx
}
