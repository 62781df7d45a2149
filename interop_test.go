package main

// Clients no one here wrote: Apache Kafka's own console consumer and producer
// (from the Maven artifacts .ci/kafka.sh fetches) read pay-order as the
// contract says, and a result they write is applied.

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// kafkaScript is .ci/kafka.sh when KAFKA_SCRIPT names it: the tests that need
// Kafka's own programs (console tools, a 3-node cluster) run only then.
func kafkaScript(t testing.TB) string {
	t.Helper()
	s := os.Getenv("KAFKA_SCRIPT")
	if s == "" {
		t.Skip("KAFKA_SCRIPT is not set (.ci/run sets it to .ci/kafka.sh): Kafka's own programs are not available")
	}
	return s
}

// kafkaTool runs one of Kafka's Java command-line programs.
func kafkaTool(t *testing.T, stdin string, class string, args ...string) string {
	t.Helper()
	cp, err := exec.Command(kafkaScript(t), "classpath").Output()
	if err != nil {
		t.Fatalf("kafka classpath: %v", err)
	}
	cmd := exec.Command("java", append([]string{"-cp", strings.TrimSpace(string(cp)), class}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s%s", class, err, out.String(), errOut.String())
	}
	return out.String()
}

// Kafka's own console tools speak the contract: the console consumer reads
// pay-order's key, headers and value; a result from the console producer is
// applied.
func TestKafkaConsoleToolsSpeakTheContract(t *testing.T) {
	kafkaScript(t)
	b, _, s := startStack(t)
	user := newUser()
	o := s.createOrder(t, user, 1234)
	readPayOrders(t, b, []string{o.ID}, 10*time.Second)

	// Kafka 4 renamed the tools' --property and moved the producer out of
	// the broker's package; 3.9 knows only the old names.
	formatter, reader, producer := "--formatter-property", "--reader-property", "org.apache.kafka.tools.ConsoleProducer"
	if v, err := exec.Command(kafkaScript(t), "version").Output(); err == nil && strings.HasPrefix(string(v), "3.") {
		formatter, reader, producer = "--property", "--property", "kafka.tools.ConsoleProducer"
	}

	// key, event-id header and value, as kafka-console-consumer.sh prints them.
	out := kafkaTool(t, "", "org.apache.kafka.tools.consumer.ConsoleConsumer",
		"--bootstrap-server", strings.Join(b.addrs, ","), "--topic", b.topic(topicPayOrder),
		"--from-beginning", "--max-messages", "1", "--timeout-ms", "30000",
		formatter, "print.key=true", formatter, "print.headers=true",
		formatter, "key.separator=|", formatter, "headers.separator=;")
	line := strings.TrimSpace(out)
	headers, rest, ok1 := strings.Cut(line, "|")
	key, value, ok2 := strings.Cut(rest, "|")
	if !ok1 || !ok2 {
		t.Fatalf("console consumer printed %q, want headers|key|value", out)
	}
	var ev payOrderRecord
	if err := json.Unmarshal([]byte(value), &ev); err != nil {
		t.Fatalf("pay-order value %q: %v", value, err)
	}
	// Headers in the order the relay writes them: event-id, then the
	// request's trace (no tracestate: the request sent none).
	h := map[string]string{}
	var names []string
	for _, kv := range strings.Split(headers, ";") {
		k, v, _ := strings.Cut(kv, ":")
		h[k] = v
		names = append(names, k)
	}
	_, tpOK := parseTraceparent(h["traceparent"])
	if key != o.ID || ev.OrderID != o.ID || ev.Amount != 1234 || ev.UserID != user || h["event-id"] != ev.EventID ||
		!tpOK || strings.Join(names, ",") != "event-id,traceparent" {
		t.Errorf("console consumer read headers %q key %q value %+v; want event-id:<event_id>;traceparent:<W3C>, key %s",
			headers, key, ev, o.ID)
	}

	// A result written by kafka-console-producer.sh is applied.
	kafkaTool(t, o.ID+`|{"order_id": "`+o.ID+`", "status": "FAILED", "reason": "console"}`+"\n",
		producer, "--bootstrap-server", strings.Join(b.addrs, ","),
		"--topic", b.topic(topicPaymentResults), reader, "parse.key=true", reader, "key.separator=|")
	waitFor(t, 20*time.Second, "the console producer's result applied", func() bool {
		got := s.getOrder(t, user, o.ID)
		return got.Status == "FAILED" && got.FailureReason != nil && *got.FailureReason == "console"
	})
}
