package main

// metrics.go keeps the service's counters and writes them in the Prometheus
// text format; a client library would be the service's largest dependency for
// a dozen series.

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

type metrics struct {
	ordersCreated       atomic.Int64
	orderBatches        atomic.Int64
	commitsUnanswered   atomic.Int64
	eventsPublished     atomic.Int64
	publishErrors       atomic.Int64
	resultsPaid         atomic.Int64
	resultsFailed       atomic.Int64
	resultsIgnored      atomic.Int64
	resultsDeadLettered atomic.Int64

	mu       sync.Mutex
	requests map[requestKey]int64
	duration map[string]*histogram
}

type requestKey struct {
	route string
	code  int
}

var durationBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

type histogram struct {
	counts []int64 // per bucket, not cumulative
	sum    float64
	count  int64
}

func newMetrics() *metrics {
	return &metrics{requests: map[requestKey]int64{}, duration: map[string]*histogram{}}
}

func (m *metrics) resultsApplied(status string) {
	if status == "PAID" {
		m.resultsPaid.Add(1)
	} else {
		m.resultsFailed.Add(1)
	}
}

func (m *metrics) observeRequest(route string, code int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[requestKey{route, code}]++
	h := m.duration[route]
	if h == nil {
		h = &histogram{counts: make([]int64, len(durationBuckets))}
		m.duration[route] = h
	}
	s := d.Seconds()
	if i, _ := slices.BinarySearch(durationBuckets, s); i < len(durationBuckets) {
		h.counts[i]++
	}
	h.sum += s
	h.count++
}

// instrument records every request under its route pattern, never its raw
// path, so order ids cannot blow up the number of series.
func (m *metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(sw, r)
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		m.observeRequest(route, sw.code, time.Since(start))
	})
}

type statusWriter struct {
	http.ResponseWriter
	code        int
	wroteHeader bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.code, w.wroteHeader = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.wroteHeader = true
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush for Server-Sent Events.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// outboxStats are read from the database at scrape time.
type outboxStats struct {
	Backlog         int64
	OldestAgeSecond float64
}

func (m *metrics) write(w io.Writer, stats outboxStats, statsErr error) {
	counter := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("orders_created_total", "Orders created (idempotent replays excluded).", m.ordersCreated.Load())
	counter("order_write_batches_total", "Transactions that wrote orders; orders_created_total / this = orders per commit.", m.orderBatches.Load())
	counter("order_commits_unanswered_total", "Order commits whose answer was lost, settled by asking the database (pg_xact_status).", m.commitsUnanswered.Load())
	counter("outbox_events_published_total", "Outbox events published to Kafka.", m.eventsPublished.Load())
	counter("outbox_publish_errors_total", "Relay batches that failed and were retried.", m.publishErrors.Load())
	fmt.Fprintf(w, "# HELP payment_results_applied_total Payment results that changed an order's status.\n"+
		"# TYPE payment_results_applied_total counter\n"+
		"payment_results_applied_total{status=\"PAID\"} %d\npayment_results_applied_total{status=\"FAILED\"} %d\n",
		m.resultsPaid.Load(), m.resultsFailed.Load())
	counter("payment_results_ignored_total", "Duplicate or conflicting payment results that changed nothing.", m.resultsIgnored.Load())
	counter("payment_results_dlq_total", "Payment results sent to the dead-letter topic.", m.resultsDeadLettered.Load())

	up := 1
	if statsErr != nil {
		up = 0
	}
	fmt.Fprintf(w, "# HELP outbox_stats_up Whether the outbox gauges below could be read from the database.\n"+
		"# TYPE outbox_stats_up gauge\noutbox_stats_up %d\n", up)
	if statsErr == nil {
		fmt.Fprintf(w, "# HELP outbox_backlog Unpublished outbox rows.\n# TYPE outbox_backlog gauge\noutbox_backlog %d\n", stats.Backlog)
		fmt.Fprintf(w, "# HELP outbox_oldest_unpublished_age_seconds Age of the oldest unpublished outbox row (0 when none).\n"+
			"# TYPE outbox_oldest_unpublished_age_seconds gauge\noutbox_oldest_unpublished_age_seconds %s\n",
			strconv.FormatFloat(stats.OldestAgeSecond, 'f', -1, 64))
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	fmt.Fprintf(w, "# HELP http_requests_total HTTP requests by route and status code.\n# TYPE http_requests_total counter\n")
	keys := make([]requestKey, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b requestKey) int {
		if a.route != b.route {
			return cmp.Compare(a.route, b.route)
		}
		return a.code - b.code
	})
	for _, k := range keys {
		fmt.Fprintf(w, "http_requests_total{route=%s,code=\"%d\"} %d\n", strconv.Quote(k.route), k.code, m.requests[k])
	}
	fmt.Fprintf(w, "# HELP http_request_duration_seconds HTTP request duration by route.\n# TYPE http_request_duration_seconds histogram\n")
	routes := make([]string, 0, len(m.duration))
	for r := range m.duration {
		routes = append(routes, r)
	}
	slices.Sort(routes)
	for _, r := range routes {
		h := m.duration[r]
		var cum int64
		for i, le := range durationBuckets {
			cum += h.counts[i]
			fmt.Fprintf(w, "http_request_duration_seconds_bucket{route=%s,le=\"%s\"} %d\n", strconv.Quote(r), strconv.FormatFloat(le, 'f', -1, 64), cum)
		}
		fmt.Fprintf(w, "http_request_duration_seconds_bucket{route=%s,le=\"+Inf\"} %d\n", strconv.Quote(r), h.count)
		fmt.Fprintf(w, "http_request_duration_seconds_sum{route=%s} %s\n", strconv.Quote(r), strconv.FormatFloat(h.sum, 'f', -1, 64))
		fmt.Fprintf(w, "http_request_duration_seconds_count{route=%s} %d\n", strconv.Quote(r), h.count)
	}
}

// handleMetrics serves /metrics; the outbox gauges cost one indexed query.
func handleMetrics(m *metrics, stats func(context.Context) (outboxStats, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		s, err := stats(ctx)
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		m.write(w, s, err)
	})
}
