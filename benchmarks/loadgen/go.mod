module moefleet/loadgen

go 1.22
