// Open-loop HTTP load generator for benchmarks/gateway_overhead.py (standard library only).
//
// Sends streaming POST requests at a fixed rate to one URL, reads each response to its end, and prints one
// JSON object: per request the time to the first body byte and to the end, in seconds, plus errors.
// Compiled at benchmark time so the generator costs little CPU next to the Python processes it measures.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"
)

type result struct {
	TTFB   []float64 `json:"ttfb"`
	Total  []float64 `json:"total"`
	Errors []string  `json:"errors"`
}

func one(client *http.Client, url string, body []byte) (float64, float64, error) {
	start := time.Now()
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		return 0, 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	buf := make([]byte, 4096)
	first := -1.0
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 && first < 0 {
			first = time.Since(start).Seconds()
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, 0, err
		}
	}
	return first, time.Since(start).Seconds(), nil
}

func main() {
	url := flag.String("url", "", "full URL to POST to")
	rate := flag.Float64("rate", 100, "requests per second")
	seconds := flag.Float64("seconds", 5, "duration of the load")
	warm := flag.Int("warm", 50, "requests sent one by one before the timed load")
	payload := flag.String("body", `{"prompt":"x","stream":true}`, "request body")
	flag.Parse()
	transport := &http.Transport{MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, DisableCompression: true}
	client := &http.Client{Transport: transport, Timeout: 60 * time.Second}
	body := []byte(*payload)
	for i := 0; i < *warm; i++ {
		one(client, *url, body)
	}
	n := int(*rate * *seconds)
	ttfb := make([]float64, n)
	total := make([]float64, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(float64(i) / *rate * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ttfb[i], total[i], errs[i] = one(client, *url, body)
		}(i)
	}
	wg.Wait()
	out := result{TTFB: []float64{}, Total: []float64{}, Errors: []string{}}
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			out.Errors = append(out.Errors, errs[i].Error())
			continue
		}
		out.TTFB = append(out.TTFB, ttfb[i])
		out.Total = append(out.Total, total[i])
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
