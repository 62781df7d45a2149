package main

// metrics.go keeps the service's counters and writes them in the Prometheus
// text format; a client library would be the service's largest dependency for
// a dozen series.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type metrics struct {
	ordersCreated     atomic.Int64
	orderBatches      atomic.Int64
	commitsUnanswered atomic.Int64
	eventsPublished   atomic.Int64
	publishErrors     atomic.Int64
	resultsPaid       atomic.Int64
	resultsFailed     atomic.Int64
	resultsIgnored    atomic.Int64
	partitionsOwned   atomic.Int64 // of payment-results, by this group member
	groupSession      atomic.Int64 // the consumer group's session in force, a time.Duration; 0 until known
	partitionChanges  [len(partitionChangeKinds)]atomic.Int64
	deadLettered      [len(dlqReasons)]atomic.Int64
	ordersRefused     [len(refusedReasons)]atomic.Int64

	// The pipeline, from an order's commit to its result.
	publishLatency *histogram // commit → the broker's ack of its pay-order record
	resultLatency  *histogram // creation → its payment result applied
	relayBatch     *histogram // records per relay batch

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
	buckets []float64
	mu      sync.Mutex
	counts  []int64 // per bucket, not cumulative
	sum     float64
	count   int64
}

func newHistogram(buckets []float64) *histogram {
	return &histogram{buckets: buckets, counts: make([]int64, len(buckets))}
}

func (h *histogram) observe(v float64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if i, _ := slices.BinarySearch(h.buckets, v); i < len(h.buckets) {
		h.counts[i]++
	}
	h.sum += v
	h.count++
}

// writeTo writes the histogram's samples; labels is "" or `name="value",`.
func (h *histogram) writeTo(w io.Writer, name, labels string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var cum int64
	for i, le := range h.buckets {
		cum += h.counts[i]
		fmt.Fprintf(w, "%s_bucket{%sle=\"%s\"} %d\n", name, labels, strconv.FormatFloat(le, 'f', -1, 64), cum)
	}
	fmt.Fprintf(w, "%s_bucket{%sle=\"+Inf\"} %d\n", name, labels, h.count)
	labels = strings.TrimSuffix(labels, ",")
	if labels != "" {
		labels = "{" + labels + "}"
	}
	fmt.Fprintf(w, "%s_sum%s %s\n%s_count%s %d\n", name, labels, strconv.FormatFloat(h.sum, 'f', -1, 64), name, labels, h.count)
}

// Buckets of the pipeline: a healthy publish takes milliseconds, an outage
// minutes; a payment takes as long as the Payment Service does.
var (
	publishBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}
	resultBuckets  = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600}
	batchBuckets   = []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000}
)

// partitionChangeKinds are how this replica's share of payment-results
// changes: the group assigned partitions, revoked them (handed over after a
// commit), or the replica lost them (its session ended: fenced).
var partitionChangeKinds = [...]string{"assigned", "revoked", "lost"}

const (
	partitionsAssigned = iota
	partitionsRevoked
	partitionsLost
)

// refusedReasons are why a POST /orders was refused unwritten, more orders
// arriving than the writers can commit: the queue was full, or the request
// had waited too long in it to be written in time.
var refusedReasons = [...]string{"queue_full", "late"}

const (
	refusedQueueFull = iota
	refusedLate
)

// dlqReasons are the classes of payment results sent to the DLQ: a value
// that is not a payment result, a result for an order this service does not
// have, a value the database refuses.
var dlqReasons = [...]string{"invalid", "unknown_order", "refused"}

func newMetrics() *metrics {
	return &metrics{requests: map[requestKey]int64{}, duration: map[string]*histogram{},
		publishLatency: newHistogram(publishBuckets), resultLatency: newHistogram(resultBuckets),
		relayBatch: newHistogram(batchBuckets)}
}

func (m *metrics) deadLetteredFor(reason string) {
	m.deadLettered[slices.Index(dlqReasons[:], reason)].Add(1)
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
	m.requests[requestKey{route, code}]++
	h := m.duration[route]
	if h == nil {
		h = newHistogram(durationBuckets)
		m.duration[route] = h
	}
	m.mu.Unlock()
	h.observe(d.Seconds())
}

// statusClientClosedRequest counts a request whose client left before it was
// answered, as nginx logs it.
const statusClientClosedRequest = 499

// instrument records every request under its route pattern, never its raw
// path, so order ids cannot blow up the number of series.
func (m *metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(sw, r)
		if !sw.wroteHeader && r.Context().Err() != nil {
			// The client went away before any answer: not a 200.
			sw.code = statusClientClosedRequest
		}
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

// gauges are the parts whose state /metrics reads at each scrape, each built
// before the server that serves them; a nil one is left out.
type gauges struct {
	database    func(context.Context) (databaseGauges, error)
	orderQueue  func() (waiting, most int) // POST /orders waiting for a writer
	streams     func() streamGauges
	conns       func() (open, most int) // HTTP connections
	consumerLag func(context.Context) (map[int32]int64, error)
}

func (m *metrics) write(w io.Writer, stats databaseGauges, statsErr error, orderQueue func() (waiting, most int)) {
	counter := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("orders_created_total", "Orders created (idempotent replays excluded).", m.ordersCreated.Load())
	counter("order_write_batches_total", "Transactions that wrote orders; orders_created_total / this = orders per commit.", m.orderBatches.Load())
	counter("order_commits_unanswered_total", "Order commits whose answer was lost, settled by ending their server process and looking for the orders.", m.commitsUnanswered.Load())
	fmt.Fprintf(w, "# HELP orders_refused_total POST /orders refused unwritten (503) because more arrived than the writers can commit: "+
		"queue_full (refused at once), late (waited too long in the queue).\n# TYPE orders_refused_total counter\n")
	for i, reason := range refusedReasons {
		fmt.Fprintf(w, "orders_refused_total{reason=%q} %d\n", reason, m.ordersRefused[i].Load())
	}
	if orderQueue != nil {
		waiting, most := orderQueue()
		fmt.Fprintf(w, "# HELP order_queue_waiting POST /orders waiting for a writer now.\n# TYPE order_queue_waiting gauge\norder_queue_waiting %d\n", waiting)
		fmt.Fprintf(w, "# HELP order_queue_max POST /orders that may wait for a writer (CREATE_QUEUE_MAX); past it, 503 at once.\n"+
			"# TYPE order_queue_max gauge\norder_queue_max %d\n", most)
	}
	counter("outbox_events_published_total", "Outbox events published to Kafka.", m.eventsPublished.Load())
	counter("outbox_publish_errors_total", "Relay batches that failed and were retried.", m.publishErrors.Load())
	fmt.Fprintf(w, "# HELP payment_results_applied_total Payment results that changed an order's status.\n"+
		"# TYPE payment_results_applied_total counter\n"+
		"payment_results_applied_total{status=\"PAID\"} %d\npayment_results_applied_total{status=\"FAILED\"} %d\n",
		m.resultsPaid.Load(), m.resultsFailed.Load())
	counter("payment_results_ignored_total", "Duplicate or conflicting payment results that changed nothing.", m.resultsIgnored.Load())
	fmt.Fprintf(w, "# HELP payment_results_partitions_owned Partitions of payment-results assigned to this replica by the consumer group.\n"+
		"# TYPE payment_results_partitions_owned gauge\npayment_results_partitions_owned %d\n", m.partitionsOwned.Load())
	fmt.Fprintf(w, "# HELP payment_results_partition_changes_total Partitions of payment-results this replica was assigned, had revoked, or lost (its session ended).\n"+
		"# TYPE payment_results_partition_changes_total counter\n")
	for i, kind := range partitionChangeKinds {
		fmt.Fprintf(w, "payment_results_partition_changes_total{change=%q} %d\n", kind, m.partitionChanges[i].Load())
	}
	fmt.Fprintf(w, "# HELP payment_results_group_session_seconds The consumer group's session in force: how long a replica that dies holds its partitions (0 until known).\n"+
		"# TYPE payment_results_group_session_seconds gauge\npayment_results_group_session_seconds %s\n",
		strconv.FormatFloat(time.Duration(m.groupSession.Load()).Seconds(), 'f', -1, 64))
	fmt.Fprintf(w, "# HELP payment_results_dlq_total Payment results sent to the dead-letter topic, by reason: invalid (not a payment result), unknown_order, refused (by the database).\n"+
		"# TYPE payment_results_dlq_total counter\n")
	for i, reason := range dlqReasons {
		fmt.Fprintf(w, "payment_results_dlq_total{reason=%q} %d\n", reason, m.deadLettered[i].Load())
	}
	for _, p := range []struct {
		name, help string
		h          *histogram
	}{
		{"order_publish_latency_seconds", "Time from an order's commit to the broker's acknowledgement of its pay-order record.", m.publishLatency},
		{"order_result_latency_seconds", "Time from an order's creation to its payment result being applied.", m.resultLatency},
		{"outbox_relay_batch_records", "Records per batch the relay published.", m.relayBatch},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", p.name, p.help, p.name)
		p.h.writeTo(w, p.name, "")
	}

	writeDatabase(w, stats, statsErr)
	m.writeRequests(w)
}

// streamGauges is what /metrics shows of the event streams.
type streamGauges struct {
	open, max               int
	refusedUser, refusedAll int64
}

// writeDatabase writes the outbox's and the database's gauges, read in one
// round trip at the scrape, or that they could not be read.
func writeDatabase(w io.Writer, stats databaseGauges, statsErr error) {
	up := 1
	if statsErr != nil {
		up = 0
	}
	fmt.Fprintf(w, "# HELP outbox_stats_up Whether the outbox and database gauges below could be read from the database.\n"+
		"# TYPE outbox_stats_up gauge\noutbox_stats_up %d\n", up)
	if statsErr == nil {
		fmt.Fprintf(w, "# HELP outbox_backlog Unpublished outbox rows.\n# TYPE outbox_backlog gauge\noutbox_backlog %d\n", stats.Backlog)
		fmt.Fprintf(w, "# HELP outbox_oldest_unpublished_age_seconds Age of the oldest unpublished outbox row (0 when none).\n"+
			"# TYPE outbox_oldest_unpublished_age_seconds gauge\noutbox_oldest_unpublished_age_seconds %s\n",
			strconv.FormatFloat(stats.OldestAgeSecond, 'f', -1, 64))
		fmt.Fprintf(w, "# HELP outbox_dead_rows Outbox rows deleted and not yet removed by vacuum (PostgreSQL's estimate).\n"+
			"# TYPE outbox_dead_rows gauge\noutbox_dead_rows %d\n", stats.DeadRows)
		fmt.Fprintf(w, "# HELP database_xmin_horizon_age_transactions How many transactions old the xmin held by the oldest holder of vacuum's horizon of each kind is (0 when none); "+
			"rows deleted after it cannot be removed.\n# TYPE database_xmin_horizon_age_transactions gauge\n")
		for _, kind := range horizonKinds {
			fmt.Fprintf(w, "database_xmin_horizon_age_transactions{holder=%q} %d\n", kind, stats.Horizon[kind].Transactions)
		}
		fmt.Fprintf(w, "# HELP database_xmin_horizon_age_seconds Seconds since the oldest transaction holding vacuum's horizon began, "+
			"by holder (0 when none; a session of another role counts only if this one may read its start, pg_read_all_stats).\n"+
			"# TYPE database_xmin_horizon_age_seconds gauge\n")
		for _, kind := range []string{"session", "prepared_transaction"} {
			var secs float64
			if s := stats.Horizon[kind].Seconds; s != nil {
				secs = max(0, *s)
			}
			fmt.Fprintf(w, "database_xmin_horizon_age_seconds{holder=%q} %s\n", kind, strconv.FormatFloat(secs, 'f', -1, 64))
		}
	}

}

// writeRequests writes the HTTP requests served, by route and status, and
// their durations.
func (m *metrics) writeRequests(w io.Writer) {
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
		m.duration[r].writeTo(w, "http_request_duration_seconds", "route="+strconv.Quote(r)+",")
	}
}

// writeStreams writes the HTTP connections and event streams open, their
// caps, and the streams refused.
func writeStreams(w io.Writer, connGauges func() (open, most int), streamGauges func() streamGauges) {
	if connGauges != nil {
		open, most := connGauges()
		fmt.Fprintf(w, "# HELP http_connections_open HTTP connections open now.\n"+
			"# TYPE http_connections_open gauge\nhttp_connections_open %d\n", open)
		fmt.Fprintf(w, "# HELP http_connections_max HTTP connections this process accepts at once; past it, new ones wait in the kernel's backlog.\n"+
			"# TYPE http_connections_max gauge\nhttp_connections_max %d\n", most)
	}
	if streamGauges == nil {
		return
	}
	streams := streamGauges()
	fmt.Fprintf(w, "# HELP http_streams_open Event streams (GET /orders/{id}/events) open now.\n"+
		"# TYPE http_streams_open gauge\nhttp_streams_open %d\n", streams.open)
	fmt.Fprintf(w, "# HELP http_streams_max Event streams this process may hold at once.\n"+
		"# TYPE http_streams_max gauge\nhttp_streams_max %d\n", streams.max)
	fmt.Fprintf(w, "# HELP http_streams_refused_total Event streams refused, by the cap reached: user (429) or all (503).\n"+
		"# TYPE http_streams_refused_total counter\n"+
		"http_streams_refused_total{cap=\"user\"} %d\nhttp_streams_refused_total{cap=\"all\"} %d\n",
		streams.refusedUser, streams.refusedAll)
}

// writeLag writes the consumer group's lag on payment-results: records
// written and not yet committed, per partition, from the group's committed
// offsets and the log's start and end (three requests to the broker).
func writeLag(ctx context.Context, w io.Writer, consumerLag func(context.Context) (map[int32]int64, error)) {
	if consumerLag == nil {
		return
	}
	lag, err := consumerLag(ctx)
	up := 1
	if err != nil {
		up = 0
	}
	fmt.Fprintf(w, "# HELP payment_results_consumer_lag_up Whether the consumer lag below could be read from the broker.\n"+
		"# TYPE payment_results_consumer_lag_up gauge\npayment_results_consumer_lag_up %d\n", up)
	if err != nil {
		return
	}
	fmt.Fprintf(w, "# HELP payment_results_consumer_lag Records of payment-results not yet applied and committed by the group, per partition.\n"+
		"# TYPE payment_results_consumer_lag gauge\n")
	parts := slices.Sorted(maps.Keys(lag))
	for _, p := range parts {
		fmt.Fprintf(w, "payment_results_consumer_lag{partition=\"%d\"} %d\n", p, lag[p])
	}
}

// handleMetrics serves /metrics; the database gauges cost one round trip.
func handleMetrics(m *metrics, g gauges) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		var s databaseGauges
		err := errors.New("no database")
		if g.database != nil {
			s, err = g.database(ctx)
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		m.write(w, s, err, g.orderQueue)
		writeStreams(w, g.conns, g.streams)
		writeLag(ctx, w, g.consumerLag)
		writeRuntimeMetrics(w)
	})
}
